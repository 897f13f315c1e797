"""Memory of ONE real-size Qwen-Image-2.1 transformer block on CPU: bf16 weights, a LoRA on the seven block
Linears, forward + backward at the token count of a 1024² px image, and what that extrapolates to for 32 blocks.

    python benchmarks/qwen_image_21_block.py                        # 1024² px + 128 text tokens, LoRA r16
    python benchmarks/qwen_image_21_block.py --side 512 --rank 64   # other sizes
    python benchmarks/qwen_image_21_block.py --no_check             # skip the real-kernel cross-check (~1-2 min)

How: this CPU's bf16 matmuls run at a few GFLOP/s, so a real bf16 forward + backward of a 218 M-parameter block on
4224 tokens would take most of an hour. The block therefore runs forward and backward under
``torch._subclasses.FakeTensorMode``: every op dispatches as on CPU (same dtypes, same attention kernel choice,
same tensors saved for backward) and allocates tensors with real sizes but no data. Autograd's saved tensors are
counted with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages that are neither parameters nor the
block's input), the gradients and AdamW's states after a real (fake-data) step. The same count on real tensors at
a small token count is run first and must agree byte for byte (printed).

Printed:
- the block's weight bytes (bf16) and parameter count, against ``qwen_image.qwen_image_21.architecture_21()``;
- LoRA parameters (fp32), their gradients (fp32) and AdamW's states (fp32);
- bytes autograd saves for backward in one block forward, also per token in units of ``inner_dim`` bf16 values
  (the "activation widths per token" a memory estimator multiplies out), at two token counts (linear in tokens:
  CPU and GPU attention kernels keep no score matrix);
- the extrapolation to 32 blocks with and without gradient checkpointing (the shared modulation, input and output
  projections counted from the real config in bf16; text encoder and VAE not loaded, as when training on cached
  embeddings and latents). Not included: the backward working set and the CUDA context;
- beside it, the estimate of ``align/memory.py`` for the same run (``model_family: qwen-image-2.1``: its
  architecture and activation width), less the two terms the extrapolation leaves out, and the relative difference
  (the estimator must stay within 15 % of the measurement).

The block runs the way the full model runs it in training: the joint sequence (text tokens, then the target's
tokens), block-causal attention by ``QwenImage21AttnProcessor`` (one call for the text segment, one for the image),
text tokens modulated at t = 0 and image tokens at their timestep (``causal_condition``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers.models.transformers.transformer_qwenimage21 import (  # noqa: E402
    QwenImage21Rope,
    QwenImage21TransformerBlock,
)
from peft import inject_adapter_in_model  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.func import functional_call  # noqa: E402

from qwen_image.qwen_image_21 import architecture_21, lora_config_21  # noqa: E402

GIB = 2**30
MIB = 2**20
DTYPE = torch.bfloat16


def meta_block(arch, rank: int) -> torch.nn.Module:
    """The real-size block with a LoRA, on the meta device (its parameters are supplied per call)."""
    with torch.device("meta"):
        block = QwenImage21TransformerBlock(arch.inner_dim, arch.num_heads, arch.head_dim,
                                            mlp_ratio=arch.mlp_hidden_size // arch.inner_dim).to(DTYPE)
    block.requires_grad_(False)
    return inject_adapter_in_model(lora_config_21(rank=rank), block)


def measure(block: torch.nn.Module, arch, side_tokens: int, text_tokens: int, fake: bool) -> dict:
    """One forward + backward + AdamW step of ``block`` (bf16 weights, fp32 LoRA) on one sample's joint sequence
    of ``text_tokens`` text and ``side_tokens``² image tokens; returns the byte counts."""
    image_tokens = side_tokens * side_tokens
    is_image = torch.cat([torch.zeros(text_tokens, dtype=torch.bool), torch.ones(image_tokens, dtype=torch.bool)])
    # Data-dependent (.tolist()): computed on real tensors, then handed to the fake mode.
    rope = QwenImage21Rope(theta=10000, axes_dim=[16, 56, 56])([(1, side_tokens, side_tokens)], is_image,
                                                                device=torch.device("cpu"))
    mode = FakeTensorMode() if fake else None
    with mode if fake else contextlib.nullcontext():
        if fake:
            rope, is_image = mode.from_tensor(rope), mode.from_tensor(is_image)
        g = torch.Generator().manual_seed(0) if not fake else None
        params = {}
        for name, p in block.named_parameters():
            lora = "lora_" in name
            t = torch.empty(p.shape, dtype=torch.float32 if lora else p.dtype)
            params[name] = t.normal_(0, 0.02, generator=g).requires_grad_(lora)
        hidden = torch.randn(1, text_tokens + image_tokens, arch.inner_dim, dtype=DTYPE).requires_grad_(True)
        # Rows: [the sample's timestep, t = 0]; each block slices its scales and gates from the shared modulation.
        modulation = torch.randn(2, 4 * arch.inner_dim, dtype=DTYPE).mul(0.1)
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            seen.setdefault(storage._cdata, storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = functional_call(block, params, kwargs=dict(
                hidden_states=hidden, modulation=modulation, rotary_emb=rope, target_token_mask=is_image,
                segments=[(0, text_tokens, True)]))
        skip = {p.untyped_storage()._cdata for p in params.values()} | {hidden.untyped_storage()._cdata}
        saved = sum(n for k, n in seen.items() if k not in skip)
        out.float().pow(2).mean().backward()
        lora = [p for p in params.values() if p.requires_grad]
        optimizer = torch.optim.AdamW(lora, lr=1e-4)
        optimizer.step()
        return dict(
            tokens=text_tokens + image_tokens, saved=saved,
            weights=sum(p.numel() * p.element_size() for p in params.values() if not p.requires_grad),
            weight_params=sum(p.numel() for p in params.values() if not p.requires_grad),
            lora=sum(p.numel() * p.element_size() for p in lora), lora_params=sum(p.numel() for p in lora),
            lora_modules=len(lora) // 2, grads=sum(p.grad.numel() * p.grad.element_size() for p in lora),
            states=sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                       if torch.is_tensor(v) and v.numel() > 1),
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=1024, help="image side in px (multiple of 32)")
    ap.add_argument("--text_tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no_check", action="store_true", help="skip the real-tensor cross-check at a small size")
    args = ap.parse_args(argv)

    arch = architecture_21()
    block = meta_block(arch, args.rank)
    if not args.no_check:
        t = time.perf_counter()
        real = measure(block, arch, 4, 16, fake=False)
        fake = measure(block, arch, 4, 16, fake=True)
        agree = all(real[k] == fake[k] for k in ("saved", "grads", "states"))
        print(f"cross-check at {real['tokens']} tokens, real bf16 kernels vs fake tensors: saved {real['saved']} vs "
              f"{fake['saved']} B, grads {real['grads']} vs {fake['grads']} B, AdamW {real['states']} vs "
              f"{fake['states']} B -> {'equal' if agree else 'DIFFERENT'} ({time.perf_counter() - t:.0f} s)")
        if not agree:
            raise SystemExit("the fake-tensor count differs from the real one: the numbers below would be wrong")

    side_tokens = args.side // arch.vae_scale_factor
    m = measure(block, arch, side_tokens, args.text_tokens, fake=True)
    half = measure(block, arch, side_tokens // 2, args.text_tokens, fake=True)
    width_bytes = arch.inner_dim * 2
    print(f"Qwen-Image-2.1 block: inner {arch.inner_dim} = {arch.num_heads} heads x {arch.head_dim}, MLP "
          f"{arch.mlp_hidden_size}; {m['weight_params'] / 1e6:.1f} M params (architecture_21: "
          f"{arch.params_per_block / 1e6:.1f} M), {m['weights'] / MIB:.0f} MiB in bf16")
    print(f"LoRA r{args.rank} on {m['lora_modules']} Linears: {m['lora_params'] / 1e6:.2f} M params, "
          f"{m['lora'] / MIB:.1f} MiB fp32; gradients {m['grads'] / MIB:.1f} MiB; AdamW states "
          f"{m['states'] / MIB:.1f} MiB")
    for r, label in ((m, f"{args.side}² px"), (half, f"{args.side // 2}² px")):
        print(f"saved for backward at {label} ({r['tokens']} tokens incl. {args.text_tokens} text): "
              f"{r['saved'] / MIB:.0f} MiB = {r['saved'] / (r['tokens'] * width_bytes):.2f} inner-dim bf16 widths "
              "per token")

    n = arch.num_blocks
    weights = m["weights"] * n + arch.non_block_params * 2
    lora_all = (m["lora"] + m["grads"] + m["states"]) * n
    block_input = m["tokens"] * width_bytes
    full = weights + lora_all + m["saved"] * n
    ckpt = weights + lora_all + block_input * n + m["saved"]
    print(f"\nextrapolated to {n} blocks at {args.side}² px, batch 1 (transformer only; no backward working set, no "
          "CUDA context):")
    print(f"  weights {weights / GIB:.2f} GiB bf16 ({arch.transformer_params / 1e9:.2f} B params), "
          f"LoRA + grads + AdamW {lora_all / GIB:.2f} GiB")
    print(f"  no checkpointing:    + activations {m['saved'] * n / GIB:.2f} GiB = {full / GIB:.2f} GiB")
    print(f"  block checkpointing: + block inputs {block_input * n / GIB:.2f} GiB + one block's "
          f"{m['saved'] / GIB:.2f} GiB = {ckpt / GIB:.2f} GiB")
    compare_with_estimator(arch, args, m, {False: full, True: ckpt})
    print(f"  (when loaded: text encoder {arch.text_encoder_params / 1e9:.2f} B params = "
          f"{arch.text_encoder_params * 2 / GIB:.1f} GiB bf16, VAE {arch.vae_params / 1e6:.0f} M = "
          f"{arch.vae_params * 2 / GIB:.2f} GiB)")


def compare_with_estimator(arch, args, m: dict, measured: dict[bool, float]) -> None:
    """The estimator's training step for this run (LoRA, fp32 AdamW, batch 1) beside the measured extrapolation."""
    from align import memory
    from align.models.qwen_image_21 import architecture_from_21
    from qwen_image.qwen_image_21 import LORA_TARGETS_21

    est_arch = architecture_from_21(arch)
    widths = m["saved"] / (m["tokens"] * arch.inner_dim * 2)
    print(f"\nactivation widths per token: measured {widths:.2f}, estimator (qwen-image-2.1) "
          f"{est_arch.act_widths_per_token:.2f} (Qwen-Image: {memory.ACT_WIDTHS_PER_TOKEN})")
    # Terms the extrapolation does not have: the CUDA context and the backward working set.
    backward = m["tokens"] * memory.BACKWARD_WIDTHS_PER_TOKEN * arch.inner_dim * 2
    for checkpointing, value in measured.items():
        options = memory.Options(lora_rank=args.rank, lora_targets=LORA_TARGETS_21, resolution=args.side,
                                 text_tokens=args.text_tokens, gradient_checkpointing=checkpointing)
        est = memory.estimate(options, est_arch)
        comparable = est.training_gib * GIB - memory.CONTEXT_GIB * GIB - backward
        diff = comparable / value - 1
        print(f"  {'block checkpointing' if checkpointing else 'no checkpointing':<20} estimator {comparable / GIB:.2f} "
              f"GiB vs measured {value / GIB:.2f} GiB ({diff:+.1%}; {'within' if abs(diff) <= 0.15 else 'OUTSIDE'} "
              f"15 %); the estimator's whole step {est.training_gib:.2f} GiB")


if __name__ == "__main__":
    main()
