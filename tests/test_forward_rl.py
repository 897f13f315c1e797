"""DiffusionNFT, AWM and DGPO as trainers on the tiny model: recipes parse, bad combinations are one-line errors,
before any update (bf16) NFT's implicit velocities equal the trained one and AWM's / DGPO's ratios are exactly 1,
a short run raises the held-out brightness (ODE renders at fixed seeds, prompts not trained on), checkpoints
carry the extra adapters, the combined objective composes each method as its online term (w_grpo still means
grpo), and the memory estimate counts the old adapter and the x0 buffer."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_helpers import lora_b_off_zero
from run_helpers import metrics_after_moving_adapter

from align.configs.combined import DPOGRPOConfig
from align.configs.forward import AWMConfig, DGPOConfig, NFTConfig
from align.launch import parse_config
from align.memory import Options, estimate
from align.models import family_of
from align.objectives import get_objective
from qwen_image import QwenImage
from qwen_image.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = {m: str(ROOT / f"recipes/tiny/{m}_brightness.yaml") for m in ("nft", "awm", "dgpo")}
CONFIGS = {"nft": NFTConfig, "awm": AWMConfig, "dgpo": DGPOConfig}
HELD_OUT = ["a quiet harbour at noon", "a paper lantern"]


def _config(method: str, tmp_path, *options: str):
    return parse_config(CONFIGS[method], ["--config", TINY[method], "--output_dir", str(tmp_path), *options])


@pytest.mark.parametrize("recipe,cls", [("tiny/nft_brightness.yaml", NFTConfig), ("tiny/awm_brightness.yaml", AWMConfig),
                                        ("tiny/dgpo_brightness.yaml", DGPOConfig), ("nft_ocr.yaml", NFTConfig),
                                        ("low_vram/nft_24gb.yaml", NFTConfig), ("tiny/dpo_nft.yaml", DPOGRPOConfig),
                                        ("awm_ocr.yaml", AWMConfig), ("dgpo_ocr.yaml", DGPOConfig),
                                        ("tiny/edit_nft_lora.yaml", NFTConfig)])
def test_recipes_parse(recipe, cls, tmp_path):
    config = parse_config(cls, ["--config", str(ROOT / "recipes" / recipe), "--output_dir", str(tmp_path),
                                "--bf16", "false", "--report_to", "none", "--use_cpu", "true"])
    assert config.generation_batch_size % config.num_generations == 0 and config.true_cfg_scale == 1.0
    if recipe == "nft_ocr.yaml":  # the published Qwen-Image OCR LoRA recipe
        assert (config.nft_beta, config.beta, config.adv_clip_max) == (0.1, 1e-4, 5.0)
        assert (config.old_decay, config.old_update_interval, config.num_inference_steps) == ("delayed_linear", 2, 10)
        assert config.old_schedule() == (75, 0.0075, 0.999) and config.lora_rank == 64
    if cls is DPOGRPOConfig:
        assert config.online_method == "nft" and config.w_online == config.w_grpo > 0


def test_w_grpo_recipes_still_mean_grpo(tmp_path):
    for recipe, cfg in (("dpo_grpo.yaml", 4.0), ("tiny/dpo_grpo.yaml", 1.0)):
        config = parse_config(DPOGRPOConfig, ["--config", str(ROOT / "recipes" / recipe), "--output_dir", str(tmp_path),
                                              "--bf16", "false", "--report_to", "none", "--use_cpu", "true"])
        assert config.online == config.online_method == "grpo" and config.w_online == config.w_grpo > 0
        assert config.true_cfg_scale == cfg  # unset in the real recipe: GRPO's default 4 as before
    off = parse_config(DPOGRPOConfig, ["--config", str(ROOT / "recipes/tiny/dpo_nft.yaml"), "--output_dir",
                                       str(tmp_path), "--w_online", "0", "--use_cpu", "true"])
    assert off.online_method is None and off.w_grpo == 0  # w_online 0: plain Flow-DPO


@pytest.mark.parametrize("method,options,message", [
    ("nft", ["--finetune", "full"], "DiffusionNFT keeps an 'old' LoRA adapter"),
    ("nft", ["--true_cfg_scale", "4"], "DiffusionNFT trains on CFG-free samples"),
    ("awm", ["--true_cfg_scale", "2"], "AWM trains on CFG-free samples"),
    ("awm", ["--awm_num_timesteps", "8"], "awm_num_timesteps 8 needs at least as many trainable steps"),
    ("awm", ["--finetune", "full", "--num_iterations", "2"], "off-policy buffers .* set finetune: lora"),
    ("dgpo", ["--per_device_train_batch_size", "2", "--num_generations", "4"], "DGPO scores whole groups per micro-step"),
    ("nft", ["--old_decay", "cosine"], "old_decay must be one of"),
])
def test_bad_combinations_are_one_line_errors(method, options, message, tmp_path):
    with pytest.raises(UserError, match=message) as info:
        _config(method, tmp_path, *options)
    assert "\n" not in str(info.value)


def test_bad_combinations_in_the_combined_objective(tmp_path):
    base = ["--config", str(ROOT / "recipes/tiny/dpo_nft.yaml"), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    with pytest.raises(UserError, match="DiffusionNFT trains on CFG-free samples"):
        parse_config(DPOGRPOConfig, [*base, "--true_cfg_scale", "4"])
    with pytest.raises(UserError, match="older name of w_online"):
        parse_config(DPOGRPOConfig, [*base, "--w_grpo", "0.5", "--w_online", "1.0"])
    with pytest.raises(UserError, match="online must be one of"):
        parse_config(DPOGRPOConfig, [*base, "--online", "ppo"])


def test_cli_refuses_full_fine_tuning_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "align/nft.py", "--config", TINY["nft"], "--finetune", "full",
                           "--output_dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: DiffusionNFT keeps an 'old' LoRA adapter")


def test_objectives_are_registered():
    for name in ("nft", "awm", "dgpo"):
        objective = get_objective(name)
        assert objective.resolved("config_class") is CONFIGS[name]
        assert objective.script_path.name == f"{name}.py" and objective.script_path.is_file()


# ------------------------------------------------------------------------------------------------ before any update
def _bf16_trainer(method: str, tmp_path, *options: str):
    from align.data.prompts import load_prompt_dataset
    from align.trainers.forward import ForwardRLTrainer

    config = _config(method, tmp_path, "--model_dtype", "bfloat16", "--beta", "0.01", *options)
    torch.manual_seed(0)
    qwen = family_of(config).load(config, torch.bfloat16)  # the tiny model of the config's family
    trainer = ForwardRLTrainer(qwen, config, train_dataset=load_prompt_dataset(prompts=config.train_prompts))
    lora_b_off_zero(trainer.model, seed=3)  # adapters on != off: the trained adapter matters
    if trainer.objective.sampler is not None:
        trainer.objective.sampler.copy_from_trained()
    if method == "nft":
        trainer.objective.old.copy_from_trained()
    return trainer


def test_nft_implicit_velocities_equal_the_trained_one_before_any_update_bf16(tmp_path):
    check_nft_implicit_velocities(_bf16_trainer("nft", tmp_path))


def check_nft_implicit_velocities(trainer) -> None:
    objective, model = trainer.objective, trainer.model
    assert model.dtype == torch.bfloat16
    batch = trainer.rollouts.batch(model)  # rolled out by the old adapter
    assert batch.x0.dtype == torch.bfloat16 and len(batch.timesteps) == 4
    plan = objective.plan(batch, 0)
    assert len(plan) == 4 and not torch.equal(plan[0][0], plan[1][0])  # a fresh order per sample
    for t, noise in plan[:2]:
        v, v_pos, v_neg = objective.implicit_velocities(model, batch, t, noise)
        assert v.dtype == torch.bfloat16 and v.requires_grad
        assert torch.equal(v_pos, v) and torch.equal(v_neg, v)
        v_ref = objective.reference_velocity(batch.to("cpu"), objective.noised(batch, t, noise), t)
        assert not torch.equal(v_ref, v.detach())  # the reference (adapters off) differs: the check is not vacuous
    objective.loss(model, batch, micro_step=0)
    stats = objective.pop_metrics()
    assert stats["old_deviation"] == 0.0 and stats["loss_pos"] == stats["loss_neg"] and stats["kl"] > 0


@pytest.mark.parametrize("method", ["awm", "dgpo"])
def test_ratios_are_exactly_one_before_any_update_bf16(method, tmp_path):
    # num_iterations 2: the buffer is trained twice, so the sampling policy is a snapshot adapter (not the current
    # weights): the ratio compares two forwards, and before any update they are bit-identical in bf16.
    check_ratios_exactly_one(_bf16_trainer(method, tmp_path, "--num_iterations", "2"))


def check_ratios_exactly_one(trainer) -> None:
    objective, model = trainer.objective, trainer.model
    assert objective.sampler is not None and not objective.on_policy
    batch = trainer.rollouts.batch(model)
    objective.loss(model, batch, micro_step=0)
    stats = objective.pop_metrics()
    assert stats["ratio/mean"] == 1.0 and stats["ratio/min"] == 1.0 and stats["ratio/max"] == 1.0
    assert stats["clip_fraction"] == 0.0
    moved = metrics_after_moving_adapter(objective, model, batch)  # after a step on the trained adapter
    assert moved["ratio/min"] != 1.0 or moved["ratio/max"] != 1.0


def test_dgpo_groups_share_noise_and_timesteps(tmp_path):
    trainer = _bf16_trainer("dgpo", tmp_path)
    batch = trainer.rollouts.batch(trainer.model)
    ids = trainer.objective.group_ids(batch)
    assert ids.tolist() == [0, 0, 0, 0]  # 4 images of one prompt per micro-step
    for t, noise in trainer.objective.plan(batch, 0):
        assert bool((t == t[0]).all()) and all(torch.equal(noise[0], noise[i]) for i in range(1, len(ids)))


# ------------------------------------------------------------------------------------------------ short runs
@pytest.mark.parametrize("method", ["nft", "awm", "dgpo"])
def test_short_run_raises_the_held_out_brightness(method, tmp_path):
    from align.launch import train_main

    trainer = train_main(method, ["--config", TINY[method], "--output_dir", str(tmp_path), "--max_steps", "12",
                                  "--monitor_prompts", *HELD_OUT, "--monitor_seeds", "2", "--eval_strategy", "steps",
                                  "--eval_steps", "12", "--eval_on_start", "true", "--disable_tqdm", "true"])
    evals = [h["eval_reward"] for h in trainer.state.log_history if "eval_reward" in h]
    train = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print(f"{method} held-out brightness:", [round(r, 4) for r in evals], "training:", [round(r, 4) for r in train])
    assert len(evals) == 2
    # the tiny VAE's brightness band is ~0.41-0.47 and a group's std ~0.01: +0.005 is a real rise
    assert evals[-1] > evals[0] + 0.005
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    if method == "nft":  # the exported adapter is the trained one only; the old one moved towards it
        from safetensors.torch import load_file

        keys = load_file(tmp_path / "pytorch_lora_weights.safetensors").keys()
        assert keys and not any(".old." in k for k in keys)
        logs = [h for h in trainer.state.log_history if "old_deviation" in h]
        assert logs[0]["old_deviation"] == 0.0 and logs[-1]["old_deviation"] > 0 and logs[-1]["old_decay"] > 0


def test_nft_checkpoint_carries_the_old_adapter_and_the_buffer(tmp_path):
    from align.launch import train_main

    trainer = train_main("nft", ["--config", TINY["nft"], "--output_dir", str(tmp_path), "--max_steps", "2",
                                 "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "true"])
    ckpt = tmp_path / "checkpoint-2"
    old = torch.load(ckpt / "old_adapter_state_0.pt", weights_only=False)
    rollout = torch.load(ckpt / "rollout_state_0.pt", weights_only=False)
    assert old["updates"] == 2 and old["weights"].keys() == trainer.objective.old.params.keys()
    assert all(torch.equal(old["weights"][k], p.cpu()) for k, p in trainer.objective.old.params.items())
    assert rollout["micro_step"] == 4 and {"x0", "sigmas", "advantages"} <= set(rollout["buffer"][0])
    assert "trajectory" not in rollout["buffer"][0]  # x0 and the grid only


# ------------------------------------------------------------------------------------------------ combined
def test_dpo_plus_nft_trains_with_both_terms(tmp_path):
    from align.data.preference import write_synthetic_pairs
    from align.dpo import main

    data = write_synthetic_pairs(tmp_path / "pairs", n=8, size=32)
    trainer = main(["--config", str(ROOT / "recipes/tiny/dpo_nft.yaml"), "--dataset_name", str(data),
                    "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "o"), "--max_steps", "2",
                    "--logging_steps", "1", "--disable_tqdm", "true"])
    assert trainer.online is trainer.grpo and trainer.method == "nft"
    logs = [h for h in trainer.state.log_history if "loss/nft" in h]
    assert len(logs) == 2 and all("loss/dpo" in h and "nft/reward" in h and "nft/old_deviation" in h for h in logs)
    assert logs[0]["nft/old_deviation"] == 0.0 and "loss/kl_rollout" in logs[0]
    assert "old_adapter" in trainer.checkpoint_states


@pytest.mark.parametrize("method", ["awm", "dgpo"])
def test_dpo_plus_awm_or_dgpo_trains_a_step(method, tmp_path):
    from align.data.preference import write_synthetic_pairs
    from align.dpo import main

    data = write_synthetic_pairs(tmp_path / "pairs", n=8, size=32)
    trainer = main(["--config", str(ROOT / "recipes/tiny/dpo_nft.yaml"), "--online", method, "--dataset_name",
                    str(data), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "o"),
                    "--awm_num_timesteps", "2", "--max_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true"])
    (log,) = [h for h in trainer.state.log_history if f"loss/{method}" in h]
    assert "loss/dpo" in log and log[f"{method}/ratio/mean"] == 1.0 and f"{method}/reward" in log


# ------------------------------------------------------------------------------------------------ memory
def test_estimate_counts_the_old_adapter_and_the_x0_buffer(tmp_path):
    config = parse_config(NFTConfig, ["--config", str(ROOT / "recipes/low_vram/nft_24gb.yaml"), "--output_dir",
                                      str(tmp_path), "--use_cpu", "true"])
    options = Options.from_config(config)
    assert options.objective == "nft" and options.extra_adapters == 1 and options.buffer_images > 0
    est = estimate(options)
    assert est.parts["extra adapters"] == pytest.approx(est.parts["LoRA"])
    assert est.parts["x0 buffer"] > 0 and est.peak_gib * 2**30 <= 24e9
    without = estimate(Options(**{**options.__dict__, "extra_adapters": 0, "buffer_images": 0}))
    assert est.training_gib > without.training_gib
    combined = parse_config(DPOGRPOConfig, ["--config", str(ROOT / "recipes/tiny/dpo_nft.yaml"), "--output_dir",
                                            str(tmp_path), "--use_cpu", "true"])
    assert Options.from_config(combined).objective == "dpo+nft" and Options.from_config(combined).extra_adapters == 1


# ------------------------------------------------------------------------------------------------ edit models
@pytest.mark.parametrize("variant", ["edit-2509", "edit-2511"])
def test_nft_on_edit_models_raises_the_held_out_reward(variant, tmp_path):
    from align.data.edit import write_synthetic_edit_prompts
    from align.launch import train_main

    prompts = write_synthetic_edit_prompts(tmp_path / "edit_prompts", n=4, size=32)
    trainer = train_main("nft", ["--config", str(ROOT / "recipes/tiny/edit_nft_lora.yaml"), "--tiny_variant", variant,
                                 "--dataset_name", str(prompts), "--output_dir", str(tmp_path / "o"),
                                 "--monitor_dataset_name", str(prompts), "--monitor_seeds", "2",
                                 "--eval_strategy", "steps", "--eval_steps", "12", "--eval_on_start", "true",
                                 "--disable_tqdm", "true"])
    assert trainer.qwen.edit_model
    assert trainer.rollouts.buffer[0].cond.references is not None  # the control images ride in the conditioning
    evals = [h["eval_reward"] for h in trainer.state.log_history if "eval_reward" in h]
    print(f"{variant} held-out brightness:", [round(r, 4) for r in evals])
    assert len(evals) == 2 and evals[-1] > evals[0] + 0.005


@pytest.mark.slow
def test_dgpo_group_spanning_two_processes_gets_one_score(tmp_path):
    # 1 prompt x 4 images per generation batch, 2 per process: the group spans both processes. One trained timestep
    # (4 steps x 0.25) per micro-step, one micro-step per step: at step 2 (policy != reference, so the score is not
    # 0) the group score's min and max over the processes agree only if its sums were all-reduced (each half alone
    # scores differently).
    import json
    import os

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "align/dgpo.py",
           "--config", TINY["dgpo"], "--output_dir", str(tmp_path), "--per_device_train_batch_size", "2",
           "--gradient_accumulation_steps", "1", "--timestep_fraction", "0.25", "--max_steps", "2",
           "--beta", "0.01", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = [h for h in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] if "reward" in h]
    assert first["kl"] == 0.0 and first["group_score/min"] == first["group_score/max"] == 0.0  # policy == reference
    assert second["kl"] > 0.0 and second["ratio/mean"] == 1.0
    assert second["group_score/min"] == second["group_score/max"] != 0.0


def test_configs_and_trainers_build_programmatically(tmp_path):
    from align.data.prompts import load_prompt_dataset
    from align.trainers.forward import ForwardRLTrainer
    from rewards import combine

    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, num_generations=2,
                  per_device_train_batch_size=2, resolution=32, num_inference_steps=4, lora_rank=2, lora_alpha=2)
    with pytest.raises(UserError, match="DiffusionNFT keeps an 'old' LoRA adapter"):
        NFTConfig(finetune="full", **common)
    for cls, extra in ((NFTConfig, {}), (AWMConfig, {"awm_num_timesteps": 2, "timestep_fraction": 1.0}), (DGPOConfig, {})):
        config = cls(**common, **extra)
        assert config.true_cfg_scale == 1.0 and config.method in ("nft", "awm", "dgpo")
        trainer = ForwardRLTrainer(QwenImage.tiny(seed=0), config, load_prompt_dataset(prompts=["a", "b"]),
                                   reward_fn=combine(["brightness"]))
        assert type(trainer.objective).method == config.method
