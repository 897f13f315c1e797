"""Memory of one GRPO update vs the number of trained timesteps: the trainer's per-timestep backward against the
all-at-once form (one graph over every trained step, what the trainer did before).

    python benchmarks/grpo_memory.py                         # tiny model, 256 px, 4 / 8 / 16 trained timesteps
    python benchmarks/grpo_memory.py --resolution 128 --steps 4 8

For each count it runs ONE update through the trainer's own code (``GRPOTrainer.training_step`` for per-timestep,
``compute_loss`` + backward for all-at-once) in a fresh process and prints:
- the peak bytes autograd holds for backward (saved-tensor hooks, unique storages, parameters excluded: independent
  of the allocator);
- the process's peak RSS (on a GPU: the CUDA peak allocated), which also counts weights, rollouts and the runtime.
The per-timestep peak should stay flat as the count grows; the all-at-once peak grows linearly.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


class SavedTensorBytes:
    """Bytes of the tensors autograd keeps for backward, live and at peak (each storage counted once)."""

    def __init__(self, exclude_ptrs: set[int]):
        self.exclude = exclude_ptrs
        self.refs: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= nbytes

    def pack(self, t):
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.exclude or nbytes == 0:
            return t
        if ptr not in self.refs:
            self.refs[ptr] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[ptr] += 1
        box = _Box(t)
        weakref.finalize(box, self._release, ptr, nbytes)
        return box

    @staticmethod
    def unpack(box):
        return box.tensor if isinstance(box, _Box) else box

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Box:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def one(steps: int, mode: str, resolution: int, cfg: float) -> dict:
    import torch

    from align.configs.grpo import GRPOConfig
    from align.data.prompts import load_prompt_dataset
    from align.launch import parse_config
    from align.trainers.grpo import GRPOTrainer
    from qwen_image import QwenImage

    out = tempfile.mkdtemp()
    config = parse_config(GRPOConfig, [
        "--config", str(ROOT / "recipes/tiny/grpo_brightness.yaml"), "--output_dir", out, "--finetune", "lora",
        "--lora_rank", "4", "--lora_alpha", "4", "--resolution", str(resolution), "--num_inference_steps", str(steps),
        "--timestep_fraction", "1.0", "--true_cfg_scale", str(cfg), "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--num_generations", "2", "--report_to", "none"])
    torch.manual_seed(0)
    trainer = GRPOTrainer(QwenImage.tiny(seed=0), config, train_dataset=load_prompt_dataset(prompts=config.train_prompts))
    model = trainer.model
    device = trainer.accelerator.device
    trainer.rollouts.batch(model)  # roll out first: only the update is measured
    trainer.current_gradient_accumulation_steps = 1
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = SavedTensorBytes(exclude)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tracker.hooks():
        if mode == "per_step":
            trainer.training_step(model, {})
        else:
            loss = trainer.compute_loss(model, {})
            trainer.accelerator.backward(loss)
    grads = sum(1 for p in model.parameters() if p.grad is not None)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"steps": steps, "mode": mode, "saved_peak": tracker.peak, "process_peak": peak, "grads": grads,
            "peak_kind": "CUDA peak" if device.type == "cuda" else "peak RSS"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16], help="trained timesteps per update")
    ap.add_argument("--cfg", type=float, default=1.0, help="true CFG scale (>1 adds the no-grad uncond forward)")
    ap.add_argument("--one", nargs=2, metavar=("STEPS", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(int(args.one[0]), args.one[1], args.resolution, args.cfg)))
        return 0
    rows = []
    for mode in ("per_step", "all_at_once"):
        for steps in args.steps:
            proc = subprocess.run([sys.executable, __file__, "--one", str(steps), mode, "--resolution",
                                   str(args.resolution), "--cfg", str(args.cfg)], capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:])
                return 1
            rows.append(json.loads(line[0][7:]))
    mib = 2**20
    print(f"one GRPO update, tiny model, {args.resolution} px, batch 2, true CFG {args.cfg}")
    print(f"{'mode':<13}{'trained steps':>14}{'autograd saved (MiB)':>22}{rows[0]['peak_kind'] + ' (MiB)':>18}")
    for r in rows:
        print(f"{r['mode']:<13}{r['steps']:>14}{r['saved_peak'] / mib:>22.1f}{r['process_peak'] / mib:>18.1f}")
    for mode in ("per_step", "all_at_once"):
        sel = [r for r in rows if r["mode"] == mode]
        growth = max(r["saved_peak"] for r in sel) / max(1, min(r["saved_peak"] for r in sel))
        print(f"METRIC\tgrpo {mode}: saved bytes max/min over {args.steps} steps\t{growth:.2f}\tx")
        for r in sel:
            print(f"METRIC\tgrpo {mode} {r['steps']} steps: autograd saved\t{r['saved_peak'] / mib:.1f}\tMiB")
    flat = [r["saved_peak"] for r in rows if r["mode"] == "per_step"]
    print(f"per-timestep saved bytes flat within 10 %: {'yes' if max(flat) <= 1.1 * min(flat) else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
