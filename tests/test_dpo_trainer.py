"""Flow-DPO end to end on the tiny model: recipes parse, full fine-tune keeps its reference frozen, and a 2-process
DDP run through ``accelerate launch`` learns a consistent preference (held-out implicit accuracy)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.configs.dpo import DPOConfig
from align.data.preference import write_synthetic_pairs
from align.launch import parse_config

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """16 synthetic pairs (chosen brighter) and one encoding cache shared by the runs of this module."""
    root = tmp_path_factory.mktemp("dpo_pairs")
    return write_synthetic_pairs(root / "data", n=16, size=32), root / "cache"


@pytest.mark.parametrize("recipe", ["dpo_lora.yaml", "dpo_full.yaml", "tiny/dpo_lora.yaml", "tiny/dpo_full.yaml"])
def test_recipes_parse(recipe, tmp_path):
    config = parse_config(DPOConfig, ["--config", str(ROOT / "recipes" / recipe), "--output_dir", str(tmp_path),
                                      "--bf16", "false", "--report_to", "none"])
    assert config.beta == 100.0 and config.loss_type == "sigmoid"
    assert config.finetune == ("full" if "full" in recipe else "lora")


def test_user_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPOConfig(output_dir=str(tmp_path), loss_type="kto", report_to=[])
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOConfig(output_dir=str(tmp_path), beta=0, report_to=[])
    with pytest.raises(TypeError, match="caption_dropout"):  # an SFT option: Flow-DPO's config has no such field
        DPOConfig(output_dir=str(tmp_path), caption_dropout=0.1, report_to=[])
    proc = subprocess.run([sys.executable, "align/dpo.py", "--config", "recipes/tiny/dpo_lora.yaml",
                           "--dataset_name", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: preference dataset")
    assert "Traceback" not in proc.stderr


def test_full_finetune_reference_unchanged_after_training(pairs, tmp_path):
    from align.dpo import main

    data, cache = pairs
    trainer = main(["--config", str(ROOT / "recipes/tiny/dpo_full.yaml"), "--dataset_name", str(data),
                    "--cache_dir", str(cache), "--output_dir", str(tmp_path), "--max_steps", "3",
                    "--eval_strategy", "no", "--eval_fraction", "0"])
    ref = trainer.reference
    assert ref.mode == "copy"
    from qwen_image.tiny import tiny_transformer

    base = dict(tiny_transformer(seed=0).named_parameters())
    policy = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in ref.module.named_parameters())
    assert sum(not torch.equal(p, base[n]) for n, p in policy.items()) > 10
    assert set(base) == set(policy)
    assert (tmp_path / "transformer" / "config.json").is_file()
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/accuracies" in h for h in history)


def test_ddp_two_processes_learns_preference(pairs, tmp_path):
    data, cache = pairs
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [ACCELERATE, "launch", "--config_file", "recipes/accelerate/multi_gpu.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "align/dpo.py", "--config", "recipes/tiny/dpo_lora.yaml", "--dataset_name", str(data),
           "--cache_dir", str(cache), "--output_dir", str(tmp_path), "--eval_fraction", "0.375",
           "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "3", "--max_steps", "20",
           "--eval_on_start", "true", "--eval_steps", "10", "--logging_steps", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    history = state["log_history"]
    evals = [h for h in history if "eval_rewards/accuracies" in h]
    assert len(evals) >= 3
    assert evals[0]["eval_rewards/accuracies"] <= 0.5  # policy == reference: no margin yet
    assert evals[-1]["eval_rewards/accuracies"] >= 0.8
    assert evals[-1]["eval_rewards/margins"] > 0
    # 10 train pairs, 2 per rank: 3 steps an epoch with two ranks (5 with one), so 20 steps pass 6 epochs.
    assert state["global_step"] == 20 and state["epoch"] > 6
    train = [h for h in history if "loss/dpo" in h]
    assert {"error/policy_chosen", "error/ref_rejected", "rewards/margins", "loss/kl"} <= set(train[-1])
    # The adapter is written in diffusers format with its metadata and loads into a fresh transformer.
    from qwen_image.tiny import tiny_transformer

    fresh = tiny_transformer(seed=0)
    fresh.load_lora_adapter(str(tmp_path / "pytorch_lora_weights.safetensors"), prefix="transformer",
                            adapter_name="default")
    assert fresh.peft_config["default"].r == 4
