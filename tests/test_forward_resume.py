"""kill -9 during DiffusionNFT, DPO+NFT and DGPO (EMA-reference mode: sampling snapshot + EMA) runs that checkpoint every step,
then ``--resume_from_checkpoint last``: the final adapter (and the old adapter / sampling snapshot / EMA reference of
the last checkpoint) equals the uninterrupted run's bit for bit. Buffers are trained twice (num_iterations 2), so checkpoints fall in the middle of a buffer;
the kill lands at a (seeded) random point after a (seeded) random checkpoint."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import ADAPTER, ROOT, assert_same_adapter, child_env, complete_checkpoints, kill_at_checkpoint, run_ok
from safetensors.torch import load_file

from align.data.preference import write_synthetic_pairs

ENV = child_env(WANDB_MODE="disabled")
COMMON = ["--lora_rank", "4", "--lora_alpha", "4", "--max_steps", "5", "--save_strategy", "steps", "--save_steps", "1",
          "--logging_steps", "1", "--gradient_accumulation_steps", "1", "--num_iterations", "2",
          "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--report_to", "none"]
# the state file each run's extra adapter leaves in a checkpoint
ADAPTER_STATE = {"nft": ("old_adapter_state_0.pt",), "combined": ("old_adapter_state_0.pt",),
                 "dgpo-ema": ("sampler_adapter_state_0.pt", "ema_ref_adapter_state_0.pt")}
RECIPES = {"dgpo-ema": "recipes/tiny/dgpo_ema_brightness.yaml"}


def _command(kind: str, out: Path, data: Path, extra: tuple[str, ...] = ()) -> list[str]:
    if kind == "combined":
        return [sys.executable, "align/dpo.py", "--config", "recipes/tiny/dpo_nft.yaml", "--dataset_name", str(data),
                "--cache_dir", str(data.parent / "cache"), "--output_dir", str(out), *COMMON, *extra]
    script = kind.split("-")[0]
    recipe = RECIPES.get(kind, f"recipes/tiny/{kind}_brightness.yaml")
    return [sys.executable, f"align/{script}.py", "--config", recipe, "--beta", "0.01",
            "--output_dir", str(out), *COMMON, *extra]


@pytest.mark.slow
# DGPO is checked in its EMA-reference mode only: with num_iterations 2 it keeps the sampling snapshot of the
# frozen-reference mode AND the EMA reference, so it covers that mode's state too (one ~40 s run less in the suite).
@pytest.mark.parametrize("kind", ["nft", "combined", "dgpo-ema"])
def test_kill_and_resume_is_exact(kind, tmp_path):
    check_kill_and_resume(kind, tmp_path)


def check_kill_and_resume(kind: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> None:
    """The whole check for one ``kind``; ``extra`` options go to every run (another model family, say)."""
    rng = random.Random(kind)
    data = write_synthetic_pairs(tmp_path / "pairs", n=8, size=32) if kind == "combined" else tmp_path
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_ok(_command(kind, full, data, extra), ENV)

    # kill once this checkpoint is complete, a random moment later; at least two steps before the end, so a fast
    # (quiet) machine cannot finish the run in between
    after = rng.choice([1, 2])
    proc = subprocess.Popen(_command(kind, killed, data, extra), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, killed, after, delay=rng.uniform(0.0, 0.2))
    assert not (killed / ADAPTER).exists()
    resume_from = complete_checkpoints(killed)[-1]
    assert int(resume_from.name.split("-")[1]) < 5
    run_ok(_command(kind, killed, data, extra) + ["--resume_from_checkpoint", "last"], ENV)

    a = assert_same_adapter(full, killed)
    assert any(not torch.equal(a[k], load_file(resume_from / ADAPTER)[k]) for k in a)
    for state in ADAPTER_STATE[kind]:
        old_a = torch.load(full / "checkpoint-5" / state, weights_only=False)
        old_b = torch.load(killed / "checkpoint-5" / state, weights_only=False)
        assert old_a["updates"] == old_b["updates"], state
        assert all(torch.equal(old_a["weights"][k], old_b["weights"][k]) for k in old_a["weights"]), state
