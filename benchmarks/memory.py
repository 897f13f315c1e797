"""What a LoRA step on the real 20B transformer holds, measured on ONE real-size block on CPU and extrapolated to
60 blocks, beside the estimate of ``align/memory.py`` (which every launcher prints). Also the CPU slowdown of each
storage option against bf16 (a hint only: GPUs have fp8/int8 kernels, CPUs mostly do not).

    python benchmarks/memory.py                     # ~5 min on 2 CPU cores
    python benchmarks/memory.py --resolutions 512   # the measured resolution only
    python benchmarks/memory.py --family qwen-image-2.1 [--side 1024 --rank 16]   # one real-size 2.1 block
                                                    # (benchmarks/qwen_image_21_block.py: its own options)

Measured, per storage format (bf16 | fp8 | int8 | nf4 | nf4 nested), on a block with the real config (inner dim
3072, 24 heads x 128, LoRA r16 on the default targets, bf16 compute):
- bytes of the block's parameters as stored (inner tensors of torchao / bitsandbytes subclasses, scales included);
- bytes autograd saves for backward in one block forward (``torch.autograd.graph.saved_tensors_hooks``, unique
  storages that are not parameters: independent of the allocator): activations at the real token count of a
  512² image, and the de-quantised weight copies a quantised block adds;
- LoRA parameters, their gradients and AdamW's states (fp32 and 8-bit) after a real training step (run in fp32
  compute on CPU, where bf16 backward is pathologically slow; LoRA, gradients and states are fp32 either way).
- DiffusionNFT's step (LoRA under a second, frozen ``old`` adapter on the same block): the old adapter's bytes, and
  the bytes autograd saves across the whole step (trained forward with graph, then the old adapter's and the
  adapter-off reference's forwards without graph, as the trainer runs them), against a plain LoRA step's.
Extrapolation to the full model, with gradient checkpointing (what the launchers use on a quantised base): the 60
blocks' weights (or 2 + resident ones when streamed) + the 40 M non-block parameters in bf16 + LoRA + gradients +
optimizer + 60 block inputs + one block's saved tensors and de-quantised copies during its recompute + the same
backward working set and context the estimator assumes (neither exists on CPU). 1024² scales the measured
per-token bytes (saved activations are linear in tokens: printed at two token counts to show it).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope, QwenImageTransformerBlock  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402

from align import memory as estimator  # noqa: E402
from align.configs import DEFAULT_LORA_TARGETS  # noqa: E402
from align.lowvram import BlockStreamer, quantize_linears, tensor_bytes  # noqa: E402

GIB = 2**30
FORMATS = {"bf16": ("none", False), "fp8": ("fp8", False), "int8": ("int8", False), "nf4": ("nf4", False),
           "nf4 nested": ("nf4", True)}
DIM, HEADS, HEAD_DIM = 3072, 24, 128  # the real config (benchmarks/gpu_scale.py builds all 60 blocks of it)
DTYPE = torch.bfloat16


def build_block(storage: str, nested: bool, rank: int, dtype: torch.dtype = DTYPE) -> torch.nn.Module:
    """One real-size block with random weights (built on meta, filled in place: fast), quantised, + LoRA."""
    with torch.device("meta"):
        block = QwenImageTransformerBlock(DIM, HEADS, HEAD_DIM)
    block = block.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    for p in block.parameters():
        p.data.normal_(0, 0.02, generator=g)
    block.requires_grad_(False)
    quantize_linears(block, storage, dtype, nested)
    block = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=DEFAULT_LORA_TARGETS), block)
    for name, p in block.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            if "lora_B" in name:
                p.data.normal_(0, 0.01, generator=g)
            p.requires_grad_(True)
    return block


def block_inputs(image_side: int, text_tokens: int, batch: int = 1, dtype: torch.dtype = DTYPE):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, image_side * image_side, DIM, generator=g).to(dtype).requires_grad_(True)
    text = torch.randn(batch, text_tokens, DIM, generator=g).to(dtype).requires_grad_(True)
    temb = torch.randn(batch, DIM, generator=g).to(dtype)
    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    freqs = rope([(1, image_side, image_side)] * batch, device=torch.device("cpu"), max_txt_seq_len=text_tokens)
    return dict(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=None, temb=temb, image_rotary_emb=freqs)


def saved_bytes(block: torch.nn.Module, inputs: dict) -> int:
    """Bytes autograd keeps for backward after one forward: unique storages that are not parameters or inputs."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen.setdefault(key, t.untyped_storage().nbytes())
        except Exception:  # noqa: BLE001 - tensor subclasses without one storage: count their inner tensors
            seen.setdefault(id(t), tensor_bytes(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(**inputs)
    skip = set()
    for p in block.parameters():
        try:
            skip.add(p.untyped_storage().data_ptr())
        except Exception:  # noqa: BLE001
            pass
    for v in (inputs["hidden_states"], inputs["encoder_hidden_states"]):
        skip.add(v.untyped_storage().data_ptr())  # the block inputs are counted as held inputs
    return sum(n for k, n in seen.items() if k not in skip)


def train_step(block, inputs, optimizer, checkpointing: bool) -> float:
    t = time.perf_counter()
    if checkpointing:
        out = torch.utils.checkpoint.checkpoint(lambda **kw: block(**kw), use_reentrant=False, **inputs)
    else:
        out = block(**inputs)
    loss = out[1].float().pow(2).mean() + out[0].float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return time.perf_counter() - t


def _tuner_layers(block: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in block.modules() if isinstance(m, BaseTunerLayer)]


def add_old_adapter(block: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """A second LoRA adapter ``old`` on the block, frozen, fp32, equal to the trained one (DiffusionNFT's sampling
    policy, as the trainer keeps it: a PEFT adapter beside the trained one); the trained adapter stays active."""
    trained = {n: p for n, p in block.named_parameters() if ".default." in n}
    with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        block = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=DEFAULT_LORA_TARGETS),
                                        block, adapter_name="old")
    old = []
    for name, p in block.named_parameters():
        if ".old." in name:
            p.data = trained[name.replace(".old.", ".default.")].detach().clone()
            p.requires_grad_(False)
            old.append(p)
    for layer in _tuner_layers(block):
        layer.set_adapter("default")
    for p in trained.values():
        p.requires_grad_(True)
    return old


def nft_step(block: torch.nn.Module, inputs: dict, optimizer=None) -> int:
    """One DiffusionNFT-shaped step: the trained forward with graph, then (no graph) the old adapter's forward and
    the adapter-off reference's, a loss on all three, backward, optimizer step. Returns the bytes autograd saved
    over the whole step (unique storages that are not parameters or the block inputs)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except Exception:  # noqa: BLE001 - tensor subclasses: count their inner tensors
            seen.setdefault(id(t), tensor_bytes(t))
        return t

    def velocity() -> torch.Tensor:  # both streams, so every trained LoRA tensor is in the graph
        text, image = block(**inputs)
        return torch.cat([text.float().flatten(), image.float().flatten()])

    layers = _tuner_layers(block)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v = velocity()
        with torch.no_grad():
            for layer in layers:
                layer.set_adapter("old")
            v_old = velocity()
            for layer in layers:
                layer.set_adapter("default")
                layer.enable_adapters(False)
            v_ref = velocity()
            for layer in layers:
                layer.enable_adapters(True)
    for name, p in block.named_parameters():  # set_adapter moves requires_grad with the active adapter
        p.requires_grad_(".default." in name)
    # the implicit positive / negative velocities around v_old, and the KL to the reference (shapes only matter here)
    positive, negative = v_old + 0.1 * (v - v_old), v_old - 0.1 * (v - v_old)
    loss = positive.pow(2).mean() + negative.pow(2).mean() + 1e-4 * (v - v_ref).pow(2).mean()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    skip = {inputs["hidden_states"].untyped_storage().data_ptr(), inputs["encoder_hidden_states"].untyped_storage().data_ptr()}
    for p in block.parameters():
        try:
            skip.add(p.untyped_storage().data_ptr())
        except Exception:  # noqa: BLE001
            pass
    return sum(n for k, n in seen.items() if k not in skip)


def measure_nft(storage: str, nested: bool, rank: int, side: int, text: int) -> dict:
    """Bytes of the old adapter, and what an NFT step saves for backward next to a plain LoRA step (bf16 compute),
    on one real-size block; checks the old adapter gets no gradient and stays unchanged by the step."""
    block = build_block(storage, nested, rank)
    inputs = block_inputs(side, text)
    plain = saved_bytes(block, inputs)
    old = add_old_adapter(block, rank)
    before = [p.detach().clone() for p in old]
    trained = [p for n, p in block.named_parameters() if ".default." in n]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    saved = nft_step(block, block_inputs(side, text), optimizer)
    assert all(p.grad is None for p in old), "the old adapter must get no gradient"
    assert all(torch.equal(a, b) for a, b in zip(before, old)), "the optimizer step must leave the old adapter alone"
    assert all(p.grad is not None for p in trained)
    return dict(old_bytes=sum(p.numel() * p.element_size() for p in old), saved_plain=plain, saved_nft=saved,
                old_params=sum(p.numel() for p in old))


def make_optimizer(params, eight_bit: bool):
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def optimizer_bytes(optimizer) -> int:
    return sum(tensor_bytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--family" in argv:  # one entry for every family's block: 2.1's measurement lives in its own script
        i = argv.index("--family")
        family = argv[i + 1] if i + 1 < len(argv) else ""
        rest = argv[:i] + argv[i + 2:]
        if family in ("qwen-image-2.1", "qwen-image-2.1-edit"):
            from qwen_image_21_block import main as measure_21

            return measure_21(rest)
        if family != "qwen-image":
            raise SystemExit(f"--family: qwen-image (default) or qwen-image-2.1, got {family!r}")
        argv = rest
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--text_len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--step_side", type=int, default=8, help="image tokens per side of the timed training step")
    ap.add_argument("--step_text", type=int, default=32)
    ap.add_argument("--measure_side", type=int, default=32, help="image tokens per side where activations are measured (512²: 32)")
    ap.add_argument("--nft_formats", nargs="*", default=["bf16", "nf4"], choices=list(FORMATS),
                    help="storage formats of the DiffusionNFT rows (trained + old adapter, x0 buffer); none: skip")
    ap.add_argument("--nft_buffer", type=int, default=16, help="rollouts whose x0 an NFT generation batch keeps")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    arch = estimator.architecture(None)
    print(f"one real-size block: inner dim {DIM}, {HEADS} heads x {HEAD_DIM}, bf16, LoRA r{args.rank}; model: "
          f"{arch.num_blocks} blocks + {arch.non_block_params / 1e6:.1f} M non-block params")

    rows: dict[str, dict] = {}
    act_per_token = None
    for label in args.formats:
        storage, nested = FORMATS[label]
        t = time.perf_counter()
        block = build_block(storage, nested, args.rank)
        frozen = sum(tensor_bytes(p) for n, p in block.named_parameters() if "lora_" not in n)
        lora = [p for p in block.parameters() if p.requires_grad]
        r = dict(block_bytes=frozen, block_params=sum(p.numel() for n, p in block.named_parameters() if "lora_" not in n),
                 lora_bytes=sum(p.numel() * p.element_size() for p in lora), lora_params=sum(p.numel() for p in lora))
        small = block_inputs(args.step_side, args.step_text)
        r["saved_small"] = saved_bytes(block, small)
        if label == "bf16":
            big = block_inputs(args.measure_side, args.text_len)
            tokens_big = args.measure_side**2 + args.text_len
            r["saved_big"] = saved_bytes(block, big)
            tokens_small = args.step_side**2 + args.step_text
            act_per_token = r["saved_big"] / tokens_big
            print(f"bf16 block saves {r['saved_small'] / tokens_small / DIM / 2:.1f} x inner_dim x 2 B per token at "
                  f"{tokens_small} tokens, {r['saved_big'] / tokens_big / DIM / 2:.1f} at {tokens_big} "
                  f"({r['saved_big'] / 2**20:.0f} MiB; estimator constant {estimator.ACT_WIDTHS_PER_TOKEN})")
            del big
        del block
        gc.collect()
        # A real training step (checkpointed, as the launchers run a quantised base): gradients, optimizer states,
        # time. In fp32 compute: CPU bf16 backward through frozen weights is ~20x slower than its forward here.
        block = build_block(storage, nested, args.rank, torch.float32)
        lora = [p for p in block.parameters() if p.requires_grad]
        small = block_inputs(args.step_side, args.step_text, dtype=torch.float32)
        for eight_bit in (False, True) if label in ("bf16", "nf4") else (False,):
            opt = make_optimizer(lora, eight_bit)
            r["sec_8bit" if eight_bit else "sec"] = train_step(block, small, opt, checkpointing=True)
            r["optimizer_8bit" if eight_bit else "optimizer"] = optimizer_bytes(opt)
            del opt
        r["grad_bytes"] = sum(p.grad.numel() * p.grad.element_size() for p in lora if p.grad is not None)
        if label == "bf16":  # streaming: the weights leave and come back every forward
            streamer = BlockStreamer([block], "cpu")
            r["sec_streamed"] = train_step(block, small, make_optimizer(lora, False), checkpointing=True)
            assert streamer.fetches == 2  # forward + recompute
            del streamer
        rows[label] = r
        n_params = rows["bf16"]["block_params"] if "bf16" in rows else arch.block_params  # Params4bit numel is packed
        r["bytes_per_param"] = frozen / n_params
        print(f"  {label}: {r['bytes_per_param']:.3f} B/param, built + measured in {time.perf_counter() - t:.0f} s")
        del block, small
        gc.collect()

    base = rows["bf16"]
    dequant = {k: max(0, r["saved_small"] - base["saved_small"]) for k, r in rows.items()}
    non_block = arch.non_block_params * 2
    lora_total = base["lora_bytes"] * arch.num_blocks
    grads_total = base["grad_bytes"] * arch.num_blocks

    print("\nper block, measured:")
    print(f"{'format':<12}{'weights MiB':>12}{'B/param':>9}{'dequant copies MiB':>20}{'LoRA MiB':>10}{'grads MiB':>10}"
          f"{'AdamW MiB':>11}{'8-bit MiB':>11}")
    for k, r in rows.items():
        print(f"{k:<12}{r['block_bytes'] / 2**20:>12.1f}{r['bytes_per_param']:>9.3f}{dequant[k] / 2**20:>20.1f}"
              f"{r['lora_bytes'] / 2**20:>10.2f}{r['grad_bytes'] / 2**20:>10.2f}{r['optimizer'] / 2**20:>11.2f}"
              + (f"{r['optimizer_8bit'] / 2**20:>11.2f}" if "optimizer_8bit" in r else f"{'':>11}"))

    print("\nextrapolated to 60 blocks (checkpointing on, batch 1) vs the estimator (align/memory.py), GiB:")
    print(f"{'option':<30}{'res':>6}{'objective':>10}{'measured':>10}{'estimate':>10}{'diff':>8}")
    worst = 0.0
    options = [("bf16", "bf16", 0, False), ("fp8", "fp8", 0, False), ("int8", "int8", 0, False), ("nf4", "nf4", 0, False),
               ("nf4 nested", "nf4 nested", 0, False), ("nf4 + 8-bit AdamW", "nf4", 0, True),
               ("fp8 + streaming (8 resident)", "fp8", 8, False)]
    def measured_gib(fmt: str, res: int, images: int, eight: bool, blocks_on_gpu: int, extra_bytes: float = 0.0,
                     extra_act_per_token: float = 0.0) -> float:
        """The 60-block step from the per-block measurements (checkpointing on)."""
        tokens = (res // 16) ** 2 + args.text_len
        opt_bytes = (rows["nf4"].get("optimizer_8bit") if eight else base["optimizer"]) * arch.num_blocks
        act = (arch.num_blocks * images * tokens * DIM * 2  # block inputs held by checkpointing
               + images * tokens * (act_per_token + extra_act_per_token) + dequant[fmt]  # one block recomputed
               + images * tokens * estimator.BACKWARD_WIDTHS_PER_TOKEN * DIM * 2)
        return (blocks_on_gpu * rows[fmt]["block_bytes"] + non_block + lora_total + grads_total + opt_bytes + act
                + extra_bytes) / GIB + estimator.CONTEXT_GIB

    def compare(label: str, res: int, objective: str, measured: float, options: estimator.Options) -> None:
        nonlocal worst
        est = estimator.estimate(options, arch)
        diff = est.training_gib / measured - 1
        worst = max(worst, abs(diff))
        print(f"{label:<30}{res:>6}{objective:>10}{measured:>10.2f}{est.training_gib:>10.2f}{100 * diff:>7.1f}%")

    common = dict(lora_rank=args.rank, lora_targets=tuple(DEFAULT_LORA_TARGETS), text_tokens=args.text_len,
                  text_encoder_storage="fp8")
    for label, fmt, resident, eight in options:
        if fmt not in rows:
            continue
        for res in args.resolutions:
            for objective, images in (("sft", 1), ("dpo", 2)):
                blocks_on_gpu = min(arch.num_blocks, resident + 2) if "streaming" in label else arch.num_blocks
                storage, nested = FORMATS[fmt]
                compare(label, res, objective, measured_gib(fmt, res, images, eight, blocks_on_gpu), estimator.Options(
                    objective=objective, base_storage=storage, nested=nested, optimizer_8bit=eight, resolution=res,
                    weight_streaming="blocks" if "streaming" in label else "none", resident_blocks=resident, **common))

    # DiffusionNFT: the old adapter measured on the block, the extra no-graph forwards' saved bytes (expected 0),
    # the x0 buffer as the tensor the trainer keeps (packed latents, 64 channels, bf16). The VAE that decodes the
    # rollouts for the reward is counted on both sides (its weights, not measured here).
    nft_rows = [f for f in args.nft_formats if f in rows]
    tokens_small = args.step_side**2 + args.step_text
    for fmt in nft_rows:
        storage, nested = FORMATS[fmt]
        eight = fmt == "nf4"  # the 24 GB NFT recipe: nf4 base + 8-bit AdamW
        m = measure_nft(storage, nested, args.rank, args.step_side, args.step_text)
        extra_act = (m["saved_nft"] - m["saved_plain"]) / tokens_small
        print(f"  NFT on the {fmt} block: old adapter {m['old_bytes'] / 2**20:.2f} MiB ({m['old_params']} params, fp32, "
              f"no grad), saved for backward {m['saved_nft'] / 2**20:.2f} MiB vs {m['saved_plain'] / 2**20:.2f} MiB for "
              f"a plain LoRA forward at {tokens_small} tokens")
        for res in args.resolutions:
            buffer = torch.empty(args.nft_buffer, (res // 16) ** 2, 64, dtype=DTYPE)
            vae = (arch.vae_params or estimator.VAE_PARAMS) * 2
            extra = m["old_bytes"] * arch.num_blocks + tensor_bytes(buffer) + vae
            label = f"{fmt} NFT" + (" + 8-bit AdamW" if eight else "")
            compare(label, res, "nft", measured_gib(fmt, res, 1, eight, arch.num_blocks, extra, extra_act),
                    estimator.Options(objective="nft", base_storage=storage, nested=nested, optimizer_8bit=eight,
                                      resolution=res, graphs=(1,), decodes=True, extra_adapters=1,
                                      buffer_images=args.nft_buffer, kl_reference=True, **common))
            del buffer
    print(f"largest estimate error: {100 * worst:.1f}% ({'within' if worst <= 0.15 else 'OUTSIDE'} 15%)")

    print(f"\nCPU step time of one block ({tokens_small} tokens, fp32 compute, checkpointed, fwd+recompute+bwd+AdamW), "
          "vs the unquantised base:")
    for k, r in rows.items():
        line = f"  {k:<12}{r['sec']:>7.2f} s  x{r['sec'] / base['sec']:.2f}"
        if "sec_8bit" in r:
            line += f"   8-bit AdamW {r['sec_8bit']:.2f} s x{r['sec_8bit'] / base['sec']:.2f}"
        if "sec_streamed" in r:
            line += f"   streamed {r['sec_streamed']:.2f} s x{r['sec_streamed'] / base['sec']:.2f} (CPU: no copy)"
        print(line)
        print(f"METRIC\tCPU block step {k}\t{r['sec']:.3f}\ts (x{r['sec'] / base['sec']:.2f} vs bf16)")


if __name__ == "__main__":
    main()
