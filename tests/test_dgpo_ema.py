"""DGPO's EMA-reference mode (``dgpo_reference: ema``) on the tiny model: the options resolve to the published
values of the chosen reference and refuse bad combinations in one line; before any update the EMA adapter equals the
trained one, so every group score is exactly 0 (bf16); a short run moves the EMA adapter on the published schedule
shape and checkpoints it; the combined objective and the memory estimate count it. Kill / resume: the ``dgpo-ema``
case of tests/test_forward_resume.py."""

from pathlib import Path

import pytest
import torch
from lora_helpers import lora_b_off_zero
from run_helpers import metrics_after_moving_adapter

from align.configs.combined import DPOGRPOConfig
from align.configs.forward import DGPOConfig, extra_adapter_count
from align.launch import parse_config
from align.losses.dgpo import DGPO_BETA_DPO, DGPO_BETA_DPO_EMA_REF, DGPO_CLIP_RANGE, DGPO_CLIP_RANGE_EMA_REF
from align.memory import Options
from align.models import family_of
from qwen_image.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FROZEN = str(ROOT / "recipes/tiny/dgpo_brightness.yaml")
EMA = str(ROOT / "recipes/tiny/dgpo_ema_brightness.yaml")
COMBINED = str(ROOT / "recipes/tiny/dpo_nft.yaml")


def _config(recipe: str, tmp_path, *options: str) -> DGPOConfig:
    return parse_config(DGPOConfig, ["--config", recipe, "--output_dir", str(tmp_path), *options])


# ------------------------------------------------------------------------------------------------ options
def test_unset_scales_take_the_published_values_of_the_reference(tmp_path):
    recipe = tmp_path / "unset.yaml"  # the tiny recipe with the DGPO scales unset
    recipe.write_text("".join(line for line in Path(FROZEN).read_text().splitlines(keepends=True)
                              if not line.startswith(("dgpo_beta_dpo", "dgpo_clip_range"))))

    def parsed(*options: str) -> DGPOConfig:
        return _config(str(recipe), tmp_path, *options)

    frozen, ema = parsed(), parsed("--dgpo_reference", "ema")
    assert (frozen.dgpo_reference, frozen.dgpo_beta_dpo, frozen.dgpo_clip_range) == ("frozen", DGPO_BETA_DPO,
                                                                                     DGPO_CLIP_RANGE)
    assert (ema.dgpo_beta_dpo, ema.dgpo_clip_range) == (DGPO_BETA_DPO_EMA_REF, DGPO_CLIP_RANGE_EMA_REF)
    assert parsed("--dgpo_reference", "ema", "--dgpo_beta_dpo", "5000").dgpo_beta_dpo == 5000.0  # explicit wins
    assert extra_adapter_count("dgpo", frozen) == 0 and extra_adapter_count("dgpo", ema) == 1
    assert extra_adapter_count("dgpo", parsed("--dgpo_reference", "ema", "--num_iterations", "2")) == 2
    assert Options.from_config(ema).extra_adapters == 1 and Options.from_config(frozen).extra_adapters == 0


def test_the_combined_objective_takes_the_ema_reference(tmp_path):
    config = parse_config(DPOGRPOConfig, ["--config", COMBINED, "--online", "dgpo", "--dgpo_reference", "ema",
                                          "--output_dir", str(tmp_path), "--use_cpu", "true"])
    assert config.online_method == "dgpo" and config.dgpo_beta_dpo == DGPO_BETA_DPO_EMA_REF
    assert Options.from_config(config).extra_adapters == 1


@pytest.mark.parametrize("options,message", [
    (["--finetune", "full"], "DGPO's EMA reference is a second LoRA adapter beside the trained one: set finetune: lora"),
    (["--dgpo_reference", "online"], "dgpo_reference must be one of"),
    (["--dgpo_ema_decay_cap", "1.0"], "dgpo_ema_decay_rate must be >= 0 and dgpo_ema_decay_cap in"),
    (["--dgpo_ema_decay_rate", "-0.1"], "dgpo_ema_decay_rate must be >= 0"),
])
def test_bad_ema_options_are_one_line_errors(options, message, tmp_path):
    with pytest.raises(UserError, match=message) as info:
        _config(EMA, tmp_path, *options)
    assert "\n" not in str(info.value)


def test_the_combined_objective_refuses_full_fine_tuning_with_the_ema_reference(tmp_path):
    with pytest.raises(UserError, match="DGPO's EMA reference is a second LoRA adapter") as info:
        parse_config(DPOGRPOConfig, ["--config", COMBINED, "--online", "dgpo", "--dgpo_reference", "ema",
                                     "--finetune", "full", "--output_dir", str(tmp_path), "--use_cpu", "true"])
    assert "\n" not in str(info.value)
    # the frozen reference keeps working with full fine-tuning (on-policy: no extra adapter)
    parse_config(DPOGRPOConfig, ["--config", COMBINED, "--online", "dgpo", "--finetune", "full",
                                 "--output_dir", str(tmp_path), "--use_cpu", "true"])


# ------------------------------------------------------------------------------------------------ before any update
def test_group_scores_are_exactly_zero_before_any_update_bf16(tmp_path):
    from align.data.prompts import load_prompt_dataset
    from align.trainers.forward import ForwardRLTrainer

    config = _config(EMA, tmp_path, "--model_dtype", "bfloat16", "--beta", "0.01")
    torch.manual_seed(0)
    qwen = family_of(config).load(config, torch.bfloat16)
    trainer = ForwardRLTrainer(qwen, config, train_dataset=load_prompt_dataset(prompts=config.train_prompts))
    objective, model = trainer.objective, trainer.model
    assert objective.ema_ref is not None and objective.checkpoint_states["ema_ref_adapter"] is objective.ema_ref
    lora_b_off_zero(model, seed=3)  # adapter on != off, so the frozen base differs from the trained policy
    objective.ema_ref.copy_from_trained()  # as at the start of a run: the EMA starts as the trained adapter
    assert model.dtype == torch.bfloat16

    batch = trainer.rollouts.batch(model)
    t, noise = objective.plan(batch, 0)[0]
    err, ref_err, old_err, v, v_ref = objective.errors(model, batch, t, noise)
    assert v.dtype == torch.bfloat16 and err.requires_grad and old_err is None
    assert torch.equal(err.detach(), ref_err)  # the EMA adapter's forward is bit-identical to the trained one
    frozen_err = objective._err(v_ref, batch, noise)
    assert not torch.equal(frozen_err, ref_err)  # the frozen base differs: the check is not vacuous

    objective.loss(model, batch, micro_step=0)
    stats = objective.pop_metrics()
    assert stats["group_score_mean"] == 0.0 and stats["group_score/min"] == 0.0 and stats["group_score/max"] == 0.0
    assert stats["group_weight_mean"] == 0.5 and stats["kl"] > 0  # the KL still compares with the frozen base

    moved = metrics_after_moving_adapter(objective, model, batch)  # the trained adapter moves, the EMA stays
    assert moved["group_score/min"] != 0.0 or moved["group_score/max"] != 0.0


# ------------------------------------------------------------------------------------------------ a short run
def test_short_run_moves_the_ema_reference_and_checkpoints_it(tmp_path):
    from safetensors.torch import load_file

    from align.launch import train_main

    trainer = train_main("dgpo", ["--config", EMA, "--output_dir", str(tmp_path), "--max_steps", "3",
                                  "--save_steps", "3", "--disable_tqdm", "true"])
    ema = trainer.objective.ema_ref
    assert ema.updates == 3
    logs = [h for h in trainer.state.log_history if "ema_ref_decay" in h]
    rate = trainer.args.dgpo_ema_decay_rate
    assert [h["ema_ref_decay"] for h in logs] == pytest.approx([0.0, rate, 2 * rate])  # min(rate n, cap), n from 0
    # the first optimizer step's micro-steps score against an EMA equal to the trained adapter; then it lags
    assert logs[0]["group_score/min"] == 0.0 and logs[0]["group_score/max"] == 0.0 and logs[0]["ema_ref_rms_gap"] == 0
    assert logs[-1]["group_score/max"] != 0.0 and logs[-1]["ema_ref_rms_gap"] > 0
    assert max(float(p.abs().max()) for k, p in ema.params.items() if "lora_B" in k) > 0  # moved off the zero init

    state = torch.load(tmp_path / "checkpoint-3" / "ema_ref_adapter_state_0.pt", weights_only=False)
    assert state["updates"] == 3 and all(torch.equal(state["weights"][k], p.cpu()) for k, p in ema.params.items())
    keys = load_file(tmp_path / "pytorch_lora_weights.safetensors").keys()
    assert keys and not any("ema_ref" in k for k in keys)  # the exported adapter is the trained one only


def test_dpo_plus_dgpo_with_the_ema_reference_trains_a_step(tmp_path):
    from align.data.preference import write_synthetic_pairs
    from align.dpo import main

    data = write_synthetic_pairs(tmp_path / "pairs", n=8, size=32)
    trainer = main(["--config", COMBINED, "--online", "dgpo", "--dgpo_reference", "ema", "--dataset_name", str(data),
                    "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
                    "--logging_steps", "1", "--disable_tqdm", "true"])
    (log,) = [h for h in trainer.state.log_history if "loss/dgpo" in h]
    assert "loss/dpo" in log and log["dgpo/group_score_mean"] == 0.0 and log["dgpo/ema_ref_decay"] == 0.0
    assert trainer.checkpoint_states["ema_ref_adapter"] is trainer.grpo.ema_ref and trainer.grpo.ema_ref.updates == 1
