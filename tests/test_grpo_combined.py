"""The combined objective: w_grpo = 0 is Flow-DPO exactly, w_dpo = beta_kl = 0 is Flow-GRPO exactly (loss and
gradients), and the combined run works under 2-process CPU DDP through align/dpo.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.configs.combined import DPOGRPOConfig
from align.data.dpo import build_datasets
from align.data.preference import write_synthetic_pairs
from align.launch import parse_config
from align.losses import grpo_clip_loss
from align.rl.rollouts import recompute_log_prob
from align.trainers.combined import DPOGRPOTrainer
from align.trainers.dpo import FlowDPOTrainer

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
RECIPE = str(ROOT / "recipes/tiny/dpo_grpo.yaml")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("combined_pairs")
    return write_synthetic_pairs(root / "data", n=8, size=32), root / "cache"


def _trainer(cls, pairs, tmp_path, **overrides):
    from qwen_image import QwenImage

    data, cache = pairs
    argv = ["--config", RECIPE, "--dataset_name", str(data), "--cache_dir", str(cache), "--output_dir", str(tmp_path)]
    for k, v in overrides.items():
        argv += [f"--{k}", str(v)]
    config = parse_config(DPOGRPOConfig, argv)
    qwen = QwenImage.tiny(seed=0)
    train_ds, _ = build_datasets(config, qwen)
    torch.manual_seed(123)  # identical LoRA init in every trainer built here
    kwargs = {"grpo_prompts": None} if cls is DPOGRPOTrainer else {}
    if cls is DPOGRPOTrainer and config.w_grpo > 0:
        from align.data.prompts import load_prompt_dataset

        kwargs["grpo_prompts"] = load_prompt_dataset(prompts=config.train_prompts)
    trainer = cls(qwen, config, train_dataset=train_ds, **kwargs)
    # move lora_B off zero so the policy differs from the reference (gaussian init: adapters on == off)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    inputs = trainer._prepare_inputs(trainer.data_collator([train_ds[i] for i in range(4)]))
    return trainer, inputs


def test_w_grpo_zero_is_dpo_exactly(pairs, tmp_path):
    dpo, inputs = _trainer(FlowDPOTrainer, pairs, tmp_path / "a", w_grpo=0.0, beta_kl=0.01)
    combined, inputs_c = _trainer(DPOGRPOTrainer, pairs, tmp_path / "b", w_grpo=0.0, beta_kl=0.01)
    assert combined.grpo is None
    torch.manual_seed(5)
    loss_dpo = dpo.compute_loss(dpo.model, inputs)
    torch.manual_seed(5)
    loss_comb = combined.compute_loss(combined.model, inputs_c)
    assert torch.equal(loss_dpo, loss_comb)
    assert loss_dpo.item() != 0.0


def test_w_dpo_zero_is_grpo_exactly(pairs, tmp_path):
    trainer, inputs = _trainer(DPOGRPOTrainer, pairs, tmp_path, w_dpo=0.0, beta_kl=0.0)
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(model, inputs)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    batch = trainer.rollouts.buffer[0].to("cpu")
    assert batch.sde_steps == [0, 1, 2, 3]  # timestep_fraction 1.0: every step trained
    per_step = [grpo_clip_loss(recompute_log_prob(model, batch, j).log_prob, batch.log_probs[:, j],
                               batch.advantages, trainer.args.epsilon)[0] for j in batch.sde_steps]
    expected = torch.stack(per_step).mean()
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    assert torch.allclose(loss, expected, rtol=0, atol=1e-7)
    nonzero = 0
    for g, e in zip(grads, expected_grads):
        if e is None:
            assert g is None or not g.any()
            continue
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-9)
        nonzero += int(e.abs().sum() > 0)
    assert nonzero > 0


def test_ddp_two_processes_combined(pairs, tmp_path):
    data, cache = pairs
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "align/dpo.py", "--config", RECIPE,
           "--dataset_name", str(data), "--cache_dir", str(cache), "--output_dir", str(tmp_path),
           "--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss/dpo" in h]
    assert len(steps) == 2
    assert {"loss/grpo", "loss/kl", "loss/kl_rollout", "grpo/reward", "grpo/ratio/mean"} <= set(steps[0])
    assert steps[0]["grpo/ratio/mean"] == 1.0
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_term_grad_norms_split_the_gradient_into_its_parts(pairs, tmp_path):
    """log_term_grad_norms: grad_norm/offline is the norm of the DPO + KL gradient alone, grad_norm/grpo the norm of
    what the online term adds on top; the two parts sum to the step's gradient."""
    trainer, inputs = _trainer(DPOGRPOTrainer, pairs, tmp_path, log_term_grad_norms="true")
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)
    offline = trainer.weighted_loss(*trainer.offline_terms(model, trainer._prepare_inputs(inputs)), mode="train")
    offline_grads = [g if g is not None else torch.zeros_like(p)
                     for g, p in zip(torch.autograd.grad(offline, params, allow_unused=True), params)]
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1  # the Trainer's loop sets it before each step
    torch.manual_seed(5)  # the same timesteps and noise for the offline terms inside the step
    trainer.training_step(model, inputs)
    metrics = trainer.term_grads.pop_metrics()
    assert set(metrics) == {"grad_norm/offline", "grad_norm/grpo"}
    expected_offline = torch.sqrt(sum(g.float().pow(2).sum() for g in offline_grads)).item()
    online = [(torch.zeros_like(g) if p.grad is None else p.grad).float() - g.float()
              for p, g in zip(params, offline_grads)]
    expected_online = torch.sqrt(sum(d.pow(2).sum() for d in online)).item()
    assert expected_offline > 0 and expected_online > 0
    assert metrics["grad_norm/offline"] == pytest.approx(expected_offline, rel=1e-5)
    assert metrics["grad_norm/grpo"] == pytest.approx(expected_online, rel=1e-4)
    assert trainer.term_grads.pop_metrics() == {}  # the window starts again after each log


def test_term_grad_norms_refuse_several_processes_and_skip_an_ablation_without_online_term(pairs, tmp_path, monkeypatch):
    from qwen_image.errors import UserError

    data, cache = pairs
    argv = ["--config", RECIPE, "--dataset_name", str(data), "--output_dir", str(tmp_path), "--log_term_grad_norms", "true"]
    off = parse_config(DPOGRPOConfig, [*argv, "--w_grpo", "0"])  # the w_online: 0 ablation of the same recipe runs
    assert off.log_term_grad_norms and off.online_method is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="works in one process"):
        parse_config(DPOGRPOConfig, argv)


def test_term_grad_norms_leave_a_bf16_run_bit_identical(tmp_path):
    """The diagnostic only reads .grad: a bf16 run with gradient accumulation trains the same adapter bit for bit
    with and without it, and the parts' norms land in the log once per logging step."""
    from run_helpers import assert_same_adapter

    from align.dpo import main

    data = write_synthetic_pairs(tmp_path / "pairs", n=4, size=32)
    common = ["--config", RECIPE, "--dataset_name", str(data), "--cache_dir", str(tmp_path / "cache"),
              "--model_dtype", "bfloat16", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
              "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]
    main([*common, "--output_dir", str(tmp_path / "plain")])
    run = main([*common, "--output_dir", str(tmp_path / "probed"), "--log_term_grad_norms", "true"])
    assert run.qwen.transformer.dtype == torch.bfloat16
    assert_same_adapter(tmp_path / "plain", tmp_path / "probed")
    logs = [h for h in json.loads((tmp_path / "probed" / "trainer_state.json").read_text())["log_history"]
            if "grad_norm/offline" in h]
    assert len(logs) == 2 and all(h["grad_norm/offline"] > 0 and h["grad_norm/grpo"] > 0 for h in logs)
