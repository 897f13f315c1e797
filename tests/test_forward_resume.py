"""kill -9 during DiffusionNFT, DPO+NFT and DGPO runs that checkpoint every step, then ``--resume_from_checkpoint
last``: the final adapter (and the old adapter / sampling snapshot of the last checkpoint) equals the uninterrupted
run's bit for bit. Buffers are trained twice (num_iterations 2), so checkpoints fall in the middle of a buffer;
the kill lands at a (seeded) random point after a (seeded) random checkpoint."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.data.preference import write_synthetic_pairs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
COMMON = ["--lora_rank", "4", "--lora_alpha", "4", "--max_steps", "5", "--save_strategy", "steps", "--save_steps", "1",
          "--logging_steps", "1", "--gradient_accumulation_steps", "1", "--num_iterations", "2",
          "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--report_to", "none"]
# the state file each run's extra adapter leaves in a checkpoint
ADAPTER_STATE = {"nft": "old_adapter_state_0.pt", "combined": "old_adapter_state_0.pt",
                 "dgpo": "sampler_adapter_state_0.pt"}


def _command(kind: str, out: Path, data: Path, extra: tuple[str, ...] = ()) -> list[str]:
    if kind == "combined":
        return [sys.executable, "align/dpo.py", "--config", "recipes/tiny/dpo_nft.yaml", "--dataset_name", str(data),
                "--cache_dir", str(data.parent / "cache"), "--output_dir", str(out), *COMMON, *extra]
    return [sys.executable, f"align/{kind}.py", "--config", f"recipes/tiny/{kind}_brightness.yaml", "--beta", "0.01",
            "--output_dir", str(out), *COMMON, *extra]


def _complete_checkpoints(out: Path) -> list[Path]:
    ckpts = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[1]))


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nft", "combined", "dgpo"])
def test_kill_and_resume_is_exact(kind, tmp_path):
    check_kill_and_resume(kind, tmp_path)


def check_kill_and_resume(kind: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> None:
    """The whole check for one ``kind``; ``extra`` options go to every run (another model family, say)."""
    rng = random.Random(kind)
    data = write_synthetic_pairs(tmp_path / "pairs", n=8, size=32) if kind == "combined" else tmp_path
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(_command(kind, full, data, extra))

    # kill once this checkpoint is complete, a random moment later; at least two steps before the end, so a fast
    # (quiet) machine cannot finish the run in between
    after = rng.choice([1, 2])
    proc = subprocess.Popen(_command(kind, killed, data, extra), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any(int(p.name.split("-")[1]) >= after for p in _complete_checkpoints(killed)):
            time.sleep(rng.uniform(0.0, 0.2))
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "pytorch_lora_weights.safetensors").exists()
    resume_from = _complete_checkpoints(killed)[-1]
    assert int(resume_from.name.split("-")[1]) < 5
    _run(_command(kind, killed, data, extra) + ["--resume_from_checkpoint", "last"])

    a = load_file(full / "pytorch_lora_weights.safetensors")
    b = load_file(killed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed adapter differs by up to {diff:.3g}"
    assert any(not torch.equal(a[k], load_file(resume_from / "pytorch_lora_weights.safetensors")[k]) for k in a)
    old_a = torch.load(full / "checkpoint-5" / ADAPTER_STATE[kind], weights_only=False)
    old_b = torch.load(killed / "checkpoint-5" / ADAPTER_STATE[kind], weights_only=False)
    assert old_a["updates"] == old_b["updates"]
    assert all(torch.equal(old_a["weights"][k], old_b["weights"][k]) for k in old_a["weights"])
