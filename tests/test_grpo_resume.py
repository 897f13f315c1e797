"""kill -9 during GRPO and DPO+GRPO runs that checkpoint every step, then resume from the newest checkpoint: the
final adapter equals the uninterrupted run's exactly. The rollout buffer is reused across optimizer steps
(num_iterations 2), so checkpoints fall in the middle of a buffer, and the kill lands between two checkpoints."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import ADAPTER, ROOT, assert_same_adapter, child_env, complete_checkpoints, kill_at_checkpoint, run_ok
from safetensors.torch import load_file

from align.data.preference import write_synthetic_pairs

pytestmark = pytest.mark.slow  # processes / long runs: `-m "not slow"` skips them

ENV = child_env(WANDB_MODE="disabled")
COMMON = ["--finetune", "lora", "--lora_rank", "4", "--lora_alpha", "4", "--max_steps", "5", "--save_strategy", "steps",
          "--save_steps", "1", "--logging_steps", "1", "--gradient_accumulation_steps", "1", "--num_iterations", "2",
          "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--report_to", "none"]


def _command(kind: str, out: Path, data: Path) -> list[str]:
    if kind == "grpo":
        return [sys.executable, "align/grpo.py", "--config", "recipes/tiny/grpo_brightness.yaml", "--learning_rate",
                "3e-2", "--output_dir", str(out), *COMMON]
    return [sys.executable, "align/dpo.py", "--config", "recipes/tiny/dpo_grpo.yaml", "--dataset_name", str(data),
            "--cache_dir", str(data.parent / "cache"), "--output_dir", str(out), *COMMON]


@pytest.mark.parametrize("kind", ["grpo", "combined"])
def test_kill_and_resume_is_exact(kind, tmp_path):
    data = write_synthetic_pairs(tmp_path / "pairs", n=8, size=32) if kind == "combined" else tmp_path
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_ok(_command(kind, full, data), ENV)

    proc = subprocess.Popen(_command(kind, killed, data), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, killed, 2)  # between checkpoint-2 and checkpoint-3 (step 3 is training)
    assert not (killed / ADAPTER).exists()

    resume_from = complete_checkpoints(killed)[-1]
    assert int(resume_from.name.split("-")[1]) < 5
    run_ok(_command(kind, killed, data) + ["--resume_from_checkpoint", str(resume_from)], ENV)

    a = assert_same_adapter(full, killed)
    # the adapter did train (not a trivially equal zero update)
    assert any(not torch.equal(a[k], load_file(resume_from / ADAPTER)[k]) for k in a)
