"""A run killed with SIGKILL in the middle of a checkpoint save loses nothing: the half-written checkpoint is never
visible as ``checkpoint-N``, ``--resume_from_checkpoint last`` takes the one before, and the resumed run ends with
the weights of an uninterrupted run. (Random kills of SFT, DPO and GRPO: benchmarks/kill_resume.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_helpers import rated_images
from run_helpers import ROOT, child_env, kill_during_save
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # processes / long runs: `-m "not slow"` skips them


def test_sigkill_during_a_checkpoint_save_then_resume_last_matches_an_uninterrupted_run(tmp_path):
    from align.launch import last_complete_checkpoint
    from align.sft import main

    data = rated_images(tmp_path / "data")
    args = ["--config", str(ROOT / "recipes/tiny/sft_lora.yaml"), "--dataset_name", str(data),
            "--cache_dir", str(tmp_path / "cache"), "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1",
            "--per_device_train_batch_size", "1", "--caption_dropout", "0.5", "--validation_prompts", "[]",
            "--report_to", "none", "--logging_steps", "1", "--seed", "0", "--dataloader_num_workers", "0"]
    killed = tmp_path / "killed"
    # SFT that SIGKILLs itself while checkpoint-3 is being written
    proc = subprocess.run([sys.executable, "-c", kill_during_save(3), *args, "--output_dir", str(killed)],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = sorted(p.name for p in killed.iterdir() if "checkpoint" in p.name)
    assert names == [".incomplete-checkpoint-3", "checkpoint-1", "checkpoint-2"], names
    assert last_complete_checkpoint(killed).name == "checkpoint-2"

    # The killed process ran with one thread: so do the in-process runs (a different thread count changes the sums
    # of a matmul in the last bits, and "bit-identical" compares exactly that).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_and_compare(main, args, killed, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _resume_and_compare(main, args, killed: Path, tmp_path: Path) -> None:
    resumed = main([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "last"])
    assert resumed.state.global_step == 4
    assert sorted(p.name for p in killed.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]  # the staging folder is gone
    # Killed after the last save: `last` is checkpoint-4 = max_steps: nothing is trained (Trainer alone would run a
    # fifth step), the weights stay.
    before = load_file(killed / "pytorch_lora_weights.safetensors")
    again = main([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "last"])
    assert again.state.global_step == 4 and not (killed / "checkpoint-5").exists()
    after = load_file(killed / "pytorch_lora_weights.safetensors")
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    full = main([*args, "--output_dir", str(tmp_path / "full")])
    a = load_file(killed / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and full.state.global_step == 4
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
