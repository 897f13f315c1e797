"""Reference cost for Flow-DPO: peak memory and step time of the LoRA adapters-off reference vs a frozen copy.

Each mode runs in its own subprocess (clean peak memory: CUDA max_memory_allocated on GPU, peak RSS on CPU):
  lora+adapter_off   LoRA policy, reference = same transformer with the adapter disabled (what the trainer does)
  lora+copy          LoRA policy, reference = a frozen deep copy of the base (what it avoids)
  full+copy          full fine-tune, reference = a frozen copy (the only exact option)
  full+copy_offload  full fine-tune, the copy lives on CPU between uses (GPU only: trades time for memory)

    python benchmarks/dpo_reference.py                                  # tiny model, CPU
    python benchmarks/dpo_reference.py --layers 8 --heads 24 --head_dim 128 --joint_dim 3584 --resolution 512 \
        --dtype bfloat16 --device cuda                                  # real width, 8 of 60 blocks, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

MODES = ("lora+adapter_off", "lora+copy", "full+copy", "full+copy_offload")


def run_mode(a: argparse.Namespace) -> dict:
    import torch

    from align.configs import DEFAULT_LORA_TARGETS
    from align.modeling import add_lora
    from align.reference import ReferenceModel, _frozen_copy
    from align.trainers.base import QwenImageTrainer
    from align.trainers.dpo import FlowDPOTrainer
    from qwen_image.scheduler import make_scheduler
    from qwen_image.tiny import tiny_transformer

    torch.manual_seed(0)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    overrides = {}
    if a.layers:
        overrides.update(num_layers=a.layers, num_attention_heads=a.heads, attention_head_dim=a.head_dim,
                         joint_attention_dim=a.joint_dim)
        # Qwen-Image splits each head's rope over (frame, height, width) as 16/56/56 of 128.
        overrides["axes_dims_rope"] = (a.head_dim // 8, a.head_dim * 7 // 16, a.head_dim * 7 // 16)
    policy = tiny_transformer(seed=0, **overrides).to(dtype)
    kind, ref_kind = a.mode.split("+")
    if kind == "lora":
        base_copy = _frozen_copy(policy) if ref_kind == "copy" else None
        add_lora(policy, SimpleNamespace(lora_rank=a.rank, lora_alpha=a.rank, lora_dropout=0.0, lora_init="gaussian",
                                         init_adapter=None, lora_target_modules=list(DEFAULT_LORA_TARGETS)))
        reference = (ReferenceModel(policy, "adapter_off") if ref_kind == "adapter_off"
                     else ReferenceModel(policy, "copy", module=base_copy))
    else:
        policy.requires_grad_(True)
        reference = ReferenceModel.from_policy(policy, "full", offload=ref_kind == "copy_offload")
    policy.to(device)
    if a.grad_ckpt:
        policy.enable_gradient_checkpointing()
    reference.device = device
    if reference.mode == "copy" and not reference.offload:
        reference.module.to(device)
    args = SimpleNamespace(beta=100.0, loss_type="sigmoid", timestep_sampling="logit_normal", logit_mean=0.0,
                           logit_std=1.0, mode_scale=1.29, w_dpo=1.0, beta_kl=0.0, w_sft=0.0, loss_weighting="none")
    trainer = SimpleNamespace(args=args, reference=reference, _model_dtype=None,
                              qwen=SimpleNamespace(transformer=policy, scheduler=make_scheduler()))
    trainer.velocity = lambda *x, **k: QwenImageTrainer.velocity(trainer, *x, **k)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    tokens = (a.resolution // 16) ** 2
    joint = overrides.get("joint_attention_dim", 32)
    g = torch.Generator().manual_seed(0)
    batch = {"chosen_latents": torch.randn(a.batch, tokens, 64, generator=g).to(device),
             "rejected_latents": torch.randn(a.batch, tokens, 64, generator=g).to(device),
             "prompt_embeds": torch.randn(a.batch, a.text_len, joint, generator=g).to(device),
             "prompt_mask": None, "height": a.resolution, "width": a.resolution}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and kind == "lora"):
            terms, _ = FlowDPOTrainer.dpo_terms(trainer, policy, batch)
        loss = terms["dpo"][1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    n_params = sum(p.numel() for p in policy.parameters())
    return {"mode": a.mode, "params_M": n_params / 1e6, "peak_GiB": peak,
            "step_s": statistics.median(times), "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, help="run one mode (internal); default: all, one subprocess each")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, default=0, help="0 = the tiny model; else num_layers of a wider config")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--joint_dim", type=int, default=3584)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="pairs per step")
    p.add_argument("--text_len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--grad_ckpt", action="store_true")
    a = p.parse_args()
    if a.mode:
        print("RESULT " + json.dumps(run_mode(a)))
        return
    modes = [m for m in MODES if a.device != "cpu" or m != "full+copy_offload"]
    rows = []
    for mode in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            rows.append({"mode": mode, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.append(json.loads(line[7:]))
    print(f"Flow-DPO reference cost ({a.device}, {a.dtype}, {a.resolution}px, {a.batch} pair(s)/step, "
          f"{'tiny' if not a.layers else f'{a.layers} layers x {a.heads}x{a.head_dim}'})")
    print(f"{'mode':<20}{'params (M)':>12}{'peak GiB':>12}{'step s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<20} failed: {r['error']}")
        else:
            print(f"{r['mode']:<20}{r['params_M']:>12.2f}{r['peak_GiB']:>12.3f}{r['step_s']:>10.4f}")
            print(f"METRIC\tdpo reference {r['mode']}: peak memory\t{r['peak_GiB']:.3f}\tGiB")
            print(f"METRIC\tdpo reference {r['mode']}: step time\t{r['step_s']:.4f}\ts")


if __name__ == "__main__":
    main()
