"""The REAL Qwen-Image transformer config (60 blocks, 24x128 heads, 20.4 B params) with random weights in bf16:
seconds per iteration and peak GPU memory for LoRA SFT, Flow-DPO and Flow-GRPO steps at 1024^2.

    python benchmarks/gpu_scale.py                          # needs a GPU (~80 GB); skips cleanly on CPU
    python benchmarks/gpu_scale.py --resolution 1328 --rank 64 --modes sft dpo
    python benchmarks/gpu_scale.py --allow_cpu --layers 1 --heads 2 --head_dim 32 --joint_dim 64 --resolution 64  # smoke

Training-time inputs are what the trainers feed after caching: packed latents (B, (res/16)^2, 64) and text
embeddings (B, text_len, 3584); the text encoder and the VAE are not resident (that is the point of caching).
Not a test: numbers depend on the machine. Each mode resets the peak-memory counter; base weights are shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
from peft import LoraConfig  # noqa: E402

from align.configs import DEFAULT_LORA_TARGETS  # noqa: E402
from align.losses import flow_dpo_loss, flow_matching_loss, grpo_clip_loss, make_noisy, velocity_error  # noqa: E402
from qwen_image.latents import img_shapes  # noqa: E402
from qwen_image.sampling import Conditioning, predict_velocity, sde_step  # noqa: E402

MODES = ("sft", "dpo", "grpo")


def real_param_count() -> float:
    with torch.device("meta"):
        model = QwenImageTransformer2DModel()
    return sum(p.numel() for p in model.parameters()) / 1e9


def build(args, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    kwargs = {}
    if args.layers:
        kwargs["num_layers"] = args.layers
    if args.heads:
        kwargs.update(num_attention_heads=args.heads)
    if args.head_dim:
        kwargs.update(attention_head_dim=args.head_dim, axes_dims_rope=_axes(args.head_dim))
    if args.joint_dim:
        kwargs.update(joint_attention_dim=args.joint_dim)
    torch.manual_seed(0)
    with torch.device(device):
        model = QwenImageTransformer2DModel(**kwargs)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                 target_modules=DEFAULT_LORA_TARGETS))
    cast_training_params(model, torch.float32)
    if not args.no_grad_ckpt:
        model.enable_gradient_checkpointing()
    return model


def _axes(head_dim: int) -> tuple[int, int, int]:
    # the real split is (16, 56, 56) of 128; keep its proportions and even sizes
    f = max(2, head_dim // 8 // 2 * 2)
    rest = head_dim - f
    return (f, rest // 2 // 2 * 2, rest - rest // 2 // 2 * 2)


def inputs(args, model, batch: int, device, dtype):
    seq = (args.resolution // 16) ** 2
    joint = model.config.joint_attention_dim
    g = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.randn(batch, seq, 64, generator=g).to(device, dtype)
    text = torch.randn(batch, args.text_len, joint, generator=g).to(device, dtype)
    return x0, Conditioning(text, None), img_shapes(batch, args.resolution, args.resolution)


def sft_step(model, opt, args, device, dtype):
    x0, cond, shapes = inputs(args, model, args.batch, device, dtype)
    sigma = torch.rand(args.batch, device=device)
    noisy, target = make_noisy(x0, torch.randn_like(x0), sigma.to(dtype))
    v = predict_velocity(model, noisy, sigma, cond, shapes)
    loss = flow_matching_loss(v, target, sigma)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def dpo_step(model, opt, args, device, dtype):
    # chosen and rejected share noise and sigma; the reference is the same weights with adapters off
    x0, cond, shapes = inputs(args, model, 2 * args.batch, device, dtype)
    sigma = torch.rand(args.batch, device=device).repeat(2)
    noise = torch.randn_like(x0[: args.batch]).repeat(2, 1, 1)
    noisy, target = make_noisy(x0, noise, sigma.to(dtype))
    with torch.no_grad():
        model.disable_adapters()
        v_ref = predict_velocity(model, noisy, sigma, cond, shapes)
        model.enable_adapters()
    v = predict_velocity(model, noisy, sigma, cond, shapes)
    err, err_ref = velocity_error(v, target), velocity_error(v_ref, target)
    b = args.batch
    loss, _ = flow_dpo_loss(err[:b], err[b:], err_ref[:b], err_ref[b:], beta=100.0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def grpo_rollout(model, args, device, dtype):
    """One SDE rollout of ``batch`` images with true CFG (two passes per step), no grad."""
    x, cond, shapes = inputs(args, model, args.batch, device, dtype)
    neg = Conditioning(cond.embeds[:, :8].clone(), None)
    sigmas = torch.linspace(1.0, 0.0, args.rollout_steps + 1)
    stored = []
    with torch.no_grad():
        for i in range(args.rollout_steps):
            v = predict_velocity(model, x, sigmas[i], cond, shapes, negative=neg, true_cfg_scale=4.0)
            step = sde_step(x, v, float(sigmas[i]), float(sigmas[i + 1]), 0.7, float(sigmas[1]))
            stored.append((x, step.prev_sample, step.log_prob))
            x = step.prev_sample.to(dtype)
    return stored, cond, neg, shapes, sigmas


def grpo_update(model, opt, args, device, dtype, rollout):
    stored, cond, neg, shapes, sigmas = rollout
    adv = torch.randn(args.batch, device=device)
    for i in range(args.train_timesteps):
        x, prev, old_lp = stored[i]
        v = predict_velocity(model, x, sigmas[i], cond, shapes, negative=neg, true_cfg_scale=4.0)
        step = sde_step(x, v, float(sigmas[i]), float(sigmas[i + 1]), 0.7, float(sigmas[1]), prev_sample=prev)
        loss, _ = grpo_clip_loss(step.log_prob, old_lp, adv, 1e-4)
        (loss / args.train_timesteps).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, steps: int, warmup: int) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="images (SFT, GRPO) or pairs (DPO) per step")
    ap.add_argument("--text_len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rollout_steps", type=int, default=10, help="SDE steps of a GRPO rollout")
    ap.add_argument("--train_timesteps", type=int, default=2, help="GRPO steps trained per update (an SDE window)")
    ap.add_argument("--no_grad_ckpt", action="store_true")
    ap.add_argument("--layers", type=int, default=0, help="0 = the real 60; fewer for a smoke run")
    ap.add_argument("--heads", type=int, default=0)
    ap.add_argument("--head_dim", type=int, default=0)
    ap.add_argument("--joint_dim", type=int, default=0)
    ap.add_argument("--allow_cpu", action="store_true", help="run without a GPU (use a reduced config)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line of results")
    args = ap.parse_args(argv)

    if args.resolution % 16:
        ap.error(f"--resolution must be a multiple of 16, got {args.resolution}")
    print(f"real Qwen-Image transformer config: {real_param_count():.2f} B parameters")
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no GPU here: skipping the 20B measurements (run on a GPU machine; --allow_cpu for a reduced smoke run)")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t = time.perf_counter()
    model = build(args, device, dtype)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    print(f"built {n:.2f} B params ({n_lora:.1f} M LoRA r={args.rank}) on {device} {dtype} in {time.perf_counter() - t:.1f} s; "
          f"{args.resolution}px = {(args.resolution // 16) ** 2} image tokens, text {args.text_len}, batch {args.batch}, "
          f"grad ckpt {'off' if args.no_grad_ckpt else 'on'}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    results = {}
    if "sft" in args.modes:
        results["LoRA SFT step"] = measure(lambda: sft_step(model, opt, args, device, dtype), device, args.steps, args.warmup)
    if "dpo" in args.modes:
        results["Flow-DPO step"] = measure(lambda: dpo_step(model, opt, args, device, dtype), device, args.steps, args.warmup)
    if "grpo" in args.modes:
        holder = {}
        results[f"GRPO rollout ({args.rollout_steps} SDE steps, CFG)"] = measure(
            lambda: holder.__setitem__("r", grpo_rollout(model, args, device, dtype)), device, args.steps, args.warmup)
        results[f"GRPO update ({args.train_timesteps} trained steps)"] = measure(
            lambda: grpo_update(model, opt, args, device, dtype, holder["r"]), device, args.steps, args.warmup)
    print(f"{'step':<40}{'s/it':>10}{'peak GiB':>12}")
    for name, (sec, peak) in results.items():
        print(f"{name:<40}{sec:>10.3f}{peak:>12.2f}")
        print(f"METRIC\t20B {args.resolution}px: {name}\t{sec:.3f}\ts/it (peak {peak:.2f} GiB)")
    if args.json:
        print(json.dumps({k: {"s_per_it": v[0], "peak_gib": v[1]} for k, v in results.items()}))


if __name__ == "__main__":
    main()
