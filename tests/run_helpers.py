"""What the tests that start training processes share: the child's environment, a run's complete checkpoints, killing a run once a checkpoint is complete or in the middle of a save, and comparing two
runs' final adapters bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "pytorch_lora_weights.safetensors"


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the checkout on ``PYTHONPATH`` and one thread per process (runs compared bit for bit
    must sum in the same order), plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def launch_env() -> dict[str, str]:
    """:func:`child_env` for ``accelerate launch`` and the CLI: offline, on the CPU."""
    return child_env(HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true")


def run_ok(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the checkout and assert it exits 0 (the end of its stderr otherwise)."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def complete_checkpoints(out: Path) -> list[Path]:
    """The run's checkpoints whose trainer state is written, oldest first."""
    ckpts = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[1]))


def kill_at_checkpoint(proc: subprocess.Popen, out: Path, step: int, *, poll: float = 0.05, delay: float = 0.0,
                       timeout: float = 600) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after a checkpoint >= ``step`` is complete in ``out`` (checked every
    ``poll`` seconds); fails if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(int(p.name.split("-")[1]) >= step for p in complete_checkpoints(out)):
            if delay:
                time.sleep(delay)
            break
        time.sleep(poll)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_during_save(step: int, main: str = "align.sft") -> str:
    """A ``python -c`` program running ``main``'s ``main(sys.argv[1:])`` that SIGKILLs itself while checkpoint
    ``step`` is being written: the weights and optimizer are on disk, the RNG states and trainer state are not
    (what a real kill between two files of a save leaves)."""
    return f"""
import os, signal, sys
from transformers import Trainer
real = Trainer._save_rng_state
def dying(self, output_dir):
    if self.state.global_step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, output_dir)
Trainer._save_rng_state = dying
from {main} import main
main(sys.argv[1:])
"""


def assert_same_adapter(a: Path, b: Path) -> dict[str, torch.Tensor]:
    """The final LoRA files of runs ``a`` and ``b`` hold the same tensors bit for bit; returns ``a``'s."""
    wa, wb = load_file(a / ADAPTER), load_file(b / ADAPTER)
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"the adapters differ by up to {diff:.3g}"
    return wa


def metrics_after_moving_adapter(objective, model: torch.nn.Module, batch, scale: float = 0.05) -> dict[str, float]:
    """Move every trainable parameter by random noise (as an optimiser step would), compute the objective's loss
    on the same batch again and return its metrics: whatever compared two equal forwards before must differ now."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    objective.loss(model, batch, micro_step=0)
    return objective.pop_metrics()
