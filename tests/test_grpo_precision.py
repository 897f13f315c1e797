"""GRPO at real precision and scale: in bf16 the recomputed log-probs equal the stored ones bit for bit (ratio
exactly 1, nothing clipped, before the first update) for GRPO and DPO+GRPO, with and without CFG and an SDE
window; the per-timestep backward gives the all-at-once gradient; seeds decide the SDE noise; LoRA init is seeded."""

import json
from pathlib import Path

import pytest
import torch
from lora_helpers import lora_b_off_zero, perturbed_lora

from align.rl.rollouts import generate_rollouts, recompute_log_prob
from qwen_image import QwenImage

ROOT = Path(__file__).resolve().parents[1]
GRPO_RECIPE = str(ROOT / "recipes/tiny/grpo_brightness.yaml")
COMBINED_RECIPE = str(ROOT / "recipes/tiny/dpo_grpo.yaml")


@pytest.fixture(scope="module")
def bf16_model():
    return perturbed_lora(QwenImage.tiny(seed=0, dtype=torch.bfloat16))


@pytest.mark.parametrize("cfg,window", [(1.0, None), (3.0, None), (3.0, (1, 3))])
def test_bf16_recomputed_log_prob_is_bit_identical(bf16_model, cfg, window):
    q = bf16_model
    assert q.transformer.dtype == torch.bfloat16
    batch = generate_rollouts(q, q.transformer, ["a red cat", "a red cat", 'a sign that says "HI"'], height=32,
                              width=32, num_inference_steps=4, noise_level=0.7, sde_window=window,
                              true_cfg_scale=cfg, seeds=[0, 1, 2])
    assert batch.trajectory.dtype == torch.bfloat16
    for j in batch.sde_steps:
        with torch.no_grad():
            step = recompute_log_prob(q.transformer, batch, j)
        assert torch.equal(step.log_prob, batch.log_probs[:, j]), (j, step.log_prob - batch.log_probs[:, j])


def _history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.mark.parametrize("trainer,cfg,window", [("grpo", 1.0, 0), ("grpo", 3.0, 2), ("combined", 1.0, 0),
                                                ("combined", 3.0, 2)])
def test_bf16_trainers_start_at_ratio_one(trainer, cfg, window, tmp_path):
    """Both micro-steps of the first optimizer step train on fresh rollouts with the rollout weights."""
    common = ["--output_dir", str(tmp_path / "out"), "--model_dtype", "bfloat16", "--max_steps", "1",
              "--logging_steps", "1", "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "2",
              "--true_cfg_scale", str(cfg), "--sde_window_size", str(window), "--timestep_fraction", "1.0",
              "--epsilon", "1e-4", "--disable_tqdm", "true"]
    if trainer == "grpo":
        from align.grpo import main

        run = main(["--config", GRPO_RECIPE, "--finetune", "lora", "--lora_rank", "4", "--lora_alpha", "4", *common])
        prefix = ""
    else:
        from align.data.preference import write_synthetic_pairs
        from align.dpo import main

        data = write_synthetic_pairs(tmp_path / "pairs", n=4, size=32)
        run = main(["--config", COMBINED_RECIPE, "--dataset_name", str(data), "--cache_dir", str(tmp_path / "cache"), *common])
        prefix = "grpo/"
    assert run.qwen.transformer.dtype == torch.bfloat16
    (log,) = [h for h in _history(tmp_path / "out") if f"{prefix}ratio/mean" in h]
    assert log[f"{prefix}ratio/min"] == 1.0 and log[f"{prefix}ratio/max"] == 1.0, log
    assert log[f"{prefix}clip_fraction"] == 0.0


def _lora_grpo_trainer(tmp_path, *options: str):
    """A tiny LoRA GRPO trainer (beta 0.04) whose lora_B is off zero: policy != reference, so the KL term has a
    gradient too. Returns the trainer, its model and the trainable parameters."""
    from align.configs.grpo import GRPOConfig
    from align.data.prompts import load_prompt_dataset
    from align.launch import parse_config
    from align.trainers.grpo import GRPOTrainer

    config = parse_config(GRPOConfig, ["--config", GRPO_RECIPE, "--output_dir", str(tmp_path), "--finetune", "lora",
                                       "--lora_rank", "4", "--lora_alpha", "4", "--beta", "0.04", *options])
    torch.manual_seed(0)
    trainer = GRPOTrainer(QwenImage.tiny(seed=0), config, train_dataset=load_prompt_dataset(prompts=config.train_prompts))
    return trainer, trainer.model, lora_b_off_zero(trainer.model, seed=3)


def test_per_timestep_backward_equals_all_at_once(tmp_path):
    trainer, model, params = _lora_grpo_trainer(tmp_path, "--timestep_fraction", "0.75", "--true_cfg_scale", "2.0")
    batch = trainer.rollouts.batch(model)
    batch.advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    policy_loss, kl = trainer.grpo.loss(model, batch, micro_step=0)
    expected = torch.autograd.grad(policy_loss + 0.04 * kl, params, allow_unused=True)
    for p in params:
        p.grad = None
    total = trainer.grpo.backward(model, batch, lambda loss: loss.backward(), kl_weight=0.04, micro_step=0)
    assert total == pytest.approx(float((policy_loss + 0.04 * kl).detach()), rel=1e-5)
    compared = 0
    for p, e in zip(params, expected):
        if e is None:
            assert p.grad is None or not p.grad.any()
            continue
        assert torch.allclose(p.grad, e, rtol=1e-4, atol=1e-10)
        compared += int(e.abs().sum() > 0)
    assert compared > len(params) // 2
    # the same 3 of 4 steps in both forms: the trained subset is a function of (seed, rank, micro-step)
    assert trainer.grpo.train_steps(batch, 0) == trainer.grpo.train_steps(batch, 0)
    assert len(trainer.grpo.train_steps(batch, 0)) == 3



def _lora_combined_trainer(tmp_path):
    """A tiny DPO+GRPO trainer with every term weighted (DPO, velocity KL, GRPO, rollout KL), lora_B off zero.
    Returns the trainer, its model, the trainable parameters and one batch of pairs."""
    from align.configs.combined import DPOGRPOConfig
    from align.data.dpo import build_datasets
    from align.data.preference import write_synthetic_pairs
    from align.data.prompts import load_prompt_dataset
    from align.launch import parse_config
    from align.trainers.combined import DPOGRPOTrainer

    data = write_synthetic_pairs(tmp_path / "pairs", n=4, size=32)
    config = parse_config(DPOGRPOConfig, ["--config", COMBINED_RECIPE, "--dataset_name", str(data), "--cache_dir",
                                          str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
                                          "--w_dpo", "1.0", "--beta_kl", "0.05", "--w_grpo", "1.0"])
    qwen = QwenImage.tiny(seed=0)
    train_ds, _ = build_datasets(config, qwen)
    torch.manual_seed(0)
    trainer = DPOGRPOTrainer(qwen, config, train_dataset=train_ds,
                             grpo_prompts=load_prompt_dataset(prompts=config.train_prompts))
    inputs = trainer.data_collator([train_ds[i] for i in range(2)])
    return trainer, trainer.model, lora_b_off_zero(trainer.model, seed=3), inputs


@pytest.mark.parametrize("kind", ["grpo", "combined"])
def test_deepspeed_step_backpropagates_compute_loss_with_the_same_gradient(kind, tmp_path, monkeypatch):
    # Under DeepSpeed training_step back-propagates compute_loss whole (its engine steps inside each backward);
    # otherwise one timestep at a time (and, combined, the DPO terms once). Both give the same loss and gradient,
    # and both advance the micro-step.
    from accelerate.utils import DistributedType

    if kind == "grpo":
        (trainer, model, params), inputs = _lora_grpo_trainer(tmp_path), {}
    else:
        trainer, model, params, inputs = _lora_combined_trainer(tmp_path)
        assert trainer.dpo_weights_active and trainer.grpo.need_kl
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; 1 = DeepSpeed's unscaled backward
    start = trainer.rollouts.state_dict()  # rollouts are a function of the counters: rewinding redraws the same

    def step():
        for p in params:
            p.grad = None
        trainer.rollouts.load_state_dict(start)
        torch.manual_seed(11)  # the DPO terms' noise and sigma
        loss = float(trainer.training_step(model, dict(inputs)))
        assert trainer.rollouts.micro_step == 1
        return loss, [None if p.grad is None else p.grad.clone() for p in params]

    per_timestep = step()
    monkeypatch.setattr(type(trainer.accelerator), "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    backwards = []
    monkeypatch.setattr(trainer.accelerator, "backward", lambda loss, **kwargs: backwards.append(kwargs) or loss.backward())
    whole = step()
    assert backwards == [{"scale_wrt_gas": False}]  # the DeepSpeed branch ran: one backward for the micro-step
    assert whole[0] == pytest.approx(per_timestep[0], rel=1e-5)
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in whole[1]) > len(params) // 2
    for a, b in zip(per_timestep[1], whole[1]):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-4, atol=1e-10))


def test_seeds_decide_the_sde_noise(tiny_model):
    q = tiny_model
    kw = dict(height=32, width=32, num_inference_steps=3, true_cfg_scale=1.0, noise_level=0.7)
    noise = q.initial_noise(2, 32, 32, [0, 1])
    a = q.sample(["a cat", "a dog"], seed=[3, 4], latents=noise, **kw).latents
    b = q.sample(["a cat", "a dog"], seed=[3, 4], latents=noise, **kw).latents
    c = q.sample(["a cat", "a dog"], seed=[3, 9], latents=noise, **kw).latents
    assert torch.equal(a, b)
    assert torch.allclose(a[0], c[0], atol=1e-5)  # sample 0 keeps its seed, so its SDE noise
    assert not torch.allclose(a[1], c[1], atol=1e-3)  # same initial latents, other seed: other SDE noise
    d = q.sample(["a cat"], seed=5, **kw).latents
    e = q.sample(["a cat"], seed=6, **kw).latents
    assert not torch.allclose(d, e, atol=1e-3)


def test_grpo_lora_init_is_seeded(tmp_path):
    from safetensors.torch import load_file

    from align.grpo import main

    def run(name: str, seed: int) -> dict:
        main(["--config", GRPO_RECIPE, "--output_dir", str(tmp_path / name), "--finetune", "lora", "--lora_rank", "4",
              "--lora_alpha", "4", "--lora_init", "gaussian", "--max_steps", "1", "--seed", str(seed),
              "--disable_tqdm", "true"])
        return load_file(tmp_path / name / "pytorch_lora_weights.safetensors")

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
