"""Estimated peak GPU memory of a training run, from its options, before any weight loads.

Every launcher prints it (``align.modeling.load_qwen_image``) and warns when it exceeds the GPU; ``--estimate_only``
prints it and exits. ``python -m align.memory`` prints the README table (LoRA SFT / DPO / GRPO / DPO+GRPO at 1024²
for each storage option on 24 / 48 / 80 GB cards). ``benchmarks/memory.py`` measures the same components on one
real-size block and checks this model against them.

What a training step holds on the GPU (all of it is counted):

- weights: the 60 blocks' Linear weights in their storage format (bf16 2 B/param; torchao int8 1 B + 5 B per row;
  fp8 1 B + 4 B per row; nf4 0.5 B + a 4 B scale per 64 weights; nested nf4 ~0.516 B), everything else in bf16.
  With block streaming only the resident blocks plus two in flight (the block computing and the one autograd
  still holds in backward).
- LoRA parameters (fp32), their gradients (fp32) and AdamW's two states (fp32; 8-bit optimizers: 1 B each).
- activations: a block saves ``ACT_WIDTHS_PER_TOKEN`` tensors of width ``inner_dim`` per token (image + text) for
  backward (measured: benchmarks/memory.py; a family's architecture may carry its own, e.g. Qwen-Image-2.1's
  42.17 from benchmarks/qwen_image_21_block.py), plus, when its weights are torchao fp8/int8, a full-precision
  de-quantised copy of each Linear weight its backward needs (trap: without checkpointing that is an unquantised
  model's worth; bitsandbytes nf4 keeps the packed weight and de-quantises again in backward).
  With block checkpointing only each block's two input streams stay, plus one block's worth during its recompute.
- per objective: SFT one image per sample; Flow-DPO chosen + rejected in one forward (2 images per pair; the
  reference forward has no graph); GRPO one trained timestep per backward (the CFG uncond branch and the rollouts
  run without graph), plus the VAE for decoding rollouts; DPO+GRPO both graphs at once; the forward-process
  objectives (NFT / AWM / DGPO) one trained timestep per backward too, plus their extra LoRA adapters (NFT's old,
  fp32, no grads or optimizer state) and the x0 buffer of a generation batch.
- ``CONTEXT_GIB`` for the CUDA context and allocator slack.

The caching phase (text encoder + VAE, before training) is estimated too; the peak is the larger of the two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from .models.architecture import Architecture, LinearShape

__all__ = ["Architecture", "LinearShape", "Options", "Estimate", "estimate", "architecture", "report_estimate"]

logger = logging.getLogger(__name__)

GIB = 2**30
CONTEXT_GIB = 1.5
# Tensors of width inner_dim (in the compute dtype) one block saves for backward per token, LoRA on the default
# targets, no checkpointing. Measured on a real-size block (benchmarks/memory.py): 34.5 at 1024 + 128 tokens.
ACT_WIDTHS_PER_TOKEN = 34.5
# Gradients flowing through a block in backward (in/out of both streams, the MLP hidden): working set per token.
BACKWARD_WIDTHS_PER_TOKEN = 8.0
# The real Qwen-Image text encoder (Qwen2.5-VL-7B: 8.29 B params) and VAE (0.127 B params).
TEXT_ENCODER_PARAMS = 8.29e9
VAE_PARAMS = 0.127e9
OBJECTIVES = ("sft", "dpo", "grpo", "dpo+grpo")


def architecture(config_json: str | None = None) -> Architecture:
    """The real Qwen-Image transformer (diffusers' default config), or the one of ``config_json``."""
    from .models.qwen_image import qwen_image_architecture

    return qwen_image_architecture(config_json)


def architecture_of(config) -> Architecture:
    """The architecture of the config's model family and checkpoint (the real model when none is named)."""
    from .models import family_of

    return family_of(config).architecture(config)


def linear_weight_bytes(shape: LinearShape, storage: str, dtype_bytes: int, nested: bool = False) -> float:
    """Bytes of one Linear layer (weight + bias) stored as ``storage``; the bias stays in the compute dtype."""
    n = shape.in_features * shape.out_features
    bias = shape.out_features * dtype_bytes if shape.bias else 0
    if storage == "none":
        return n * dtype_bytes + bias
    if storage == "int8":  # int8 data + per-row scale and zero point
        return n + shape.out_features * 5 + bias
    if storage == "fp8":  # fp8 data + per-row fp32 scale
        return n + shape.out_features * 4 + bias
    if storage == "nf4":  # 4-bit codes + fp32 absmax per 64 (nested: 8-bit absmax + fp32 per 256 of them)
        scales = n / 64 + n / 64 / 256 * 4 if nested else n / 64 * 4
        return n / 2 + scales + bias
    raise ValueError(f"unknown storage {storage!r}")


@dataclass(frozen=True)
class Options:
    """The options that set the peak (from a training config with :meth:`from_config`, or by hand for tables)."""

    objective: str = "sft"
    finetune: str = "lora"
    base_storage: str = "none"
    nested: bool = False
    weight_streaming: str = "none"
    resident_blocks: int = 0
    optimizer_8bit: bool = False
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ()
    resolution: int = 1024
    batch: int = 1
    text_tokens: int = 256
    gradient_checkpointing: bool = True
    dtype_bytes: int = 2
    text_encoder_storage: str = "none"
    grpo_batch: int = 1
    kl_reference: bool = False
    # From the objective registry (align/objectives.py, ``MemoryTerms``) for a real config; empty / None for the
    # table, which derives them from ``objective``, ``batch`` and ``grpo_batch``.
    graphs: tuple[int, ...] = ()
    decodes: bool | None = None
    extra_adapters: int = 0
    buffer_images: int = 0

    @classmethod
    def from_config(cls, config) -> "Options":
        from .lowvram import checkpointing_reason
        from .models import family_of
        from .objectives import memory_terms

        terms = memory_terms(config)
        dtype = getattr(config, "model_dtype", "auto")
        dtype_bytes = 4 if dtype in ("float32", "fp32") else 2
        return cls(
            objective=terms.label,
            finetune=config.finetune,
            base_storage=config.base_storage,
            nested=config.use_bnb_nested_quant,
            weight_streaming=config.weight_streaming,
            resident_blocks=config.resident_blocks,
            optimizer_8bit="8bit" in str(getattr(getattr(config, "optim", ""), "value", getattr(config, "optim", ""))),
            lora_rank=config.lora_rank,
            lora_targets=tuple(config.lora_target_modules or family_of(config).default_lora_targets),
            resolution=config.resolution,
            batch=config.per_device_train_batch_size,
            text_tokens=config.estimate_text_tokens,
            gradient_checkpointing=bool(getattr(config, "transformer_gradient_checkpointing", False)
                                        or checkpointing_reason(config)),
            dtype_bytes=dtype_bytes,
            text_encoder_storage=config.text_encoder_storage,
            kl_reference=terms.reference,
            graphs=terms.graphs,
            decodes=terms.decodes,
            extra_adapters=terms.extra_adapters,
            buffer_images=terms.buffer_images,
        )

    def step_graphs(self) -> tuple[int, ...]:
        """Images per autograd graph alive at once in a training step."""
        if self.graphs:
            return self.graphs
        return {"sft": (self.batch,), "dpo": (2 * self.batch,), "grpo": (self.grpo_batch,),
                "dpo+grpo": (2 * self.batch, self.grpo_batch)}[self.objective]

    @property
    def decodes_rollouts(self) -> bool:
        return self.decodes if self.decodes is not None else self.objective in ("grpo", "dpo+grpo")


@dataclass
class Estimate:
    options: Options
    parts: dict[str, float] = field(default_factory=dict)  # GiB, training step
    caching: dict[str, float] = field(default_factory=dict)  # GiB, caching phase
    host_gib: float = 0.0  # CPU memory the streamed blocks need

    @property
    def training_gib(self) -> float:
        return sum(self.parts.values())

    @property
    def caching_gib(self) -> float:
        return sum(self.caching.values())

    @property
    def peak_gib(self) -> float:
        return max(self.training_gib, self.caching_gib)

    def lines(self) -> list[str]:
        o = self.options
        storage = o.base_storage + (" nested" if o.nested and o.base_storage == "nf4" else "")
        head = (f"estimated peak GPU memory: {self.peak_gib:.1f} GiB ({o.objective}, {o.finetune}"
                + (f" r{o.lora_rank}" if o.finetune == "lora" else "")
                + f", {o.resolution}px x{o.batch}, base {storage}, streaming {o.weight_streaming}"
                + (f" ({o.resident_blocks} resident)" if o.weight_streaming == "blocks" else "")
                + f", optimizer {'8-bit' if o.optimizer_8bit else 'fp32'} AdamW, checkpointing {'on' if o.gradient_checkpointing else 'off'})")
        train = ", ".join(f"{k} {v:.2f}" for k, v in self.parts.items())
        cache = ", ".join(f"{k} {v:.2f}" for k, v in self.caching.items())
        out = [head, f"  training step {self.training_gib:.1f} GiB: {train}", f"  caching {self.caching_gib:.1f} GiB: {cache}"]
        if self.host_gib:
            out.append(f"  CPU memory for the streamed blocks: {self.host_gib:.1f} GiB (pinned)")
        return out


def _activation_bytes(arch: Architecture, o: Options, images: int, quantised: bool) -> tuple[float, float]:
    """(bytes held by the graph of ``images`` samples, bytes of one block's recompute + backward working set)."""
    tokens = (o.resolution // 16) ** 2 + o.text_tokens
    width = arch.inner_dim * o.dtype_bytes
    per_block = images * tokens * (arch.act_widths_per_token or ACT_WIDTHS_PER_TOKEN) * width
    # torchao's weight-only matmul keeps the de-quantised weight for backward; bitsandbytes' 4-bit matmul keeps the
    # packed weight and de-quantises again in backward (measured: benchmarks/memory.py).
    dequantised = arch.grad_weight_params * o.dtype_bytes if quantised and o.base_storage != "nf4" else 0
    if o.gradient_checkpointing:
        held = arch.num_blocks * images * tokens * width  # each block's input (image + text streams)
        return held, per_block + dequantised + images * tokens * BACKWARD_WIDTHS_PER_TOKEN * width
    return arch.num_blocks * (per_block + dequantised), images * tokens * BACKWARD_WIDTHS_PER_TOKEN * width


def estimate(o: Options, arch: Architecture | None = None) -> Estimate:
    arch = arch or architecture(None)
    est = Estimate(o)
    db = o.dtype_bytes
    block = sum(linear_weight_bytes(lin, o.base_storage, db, o.nested) for lin in arch.block_linears) + arch.block_other_params * db
    on_gpu_blocks = arch.num_blocks
    if o.weight_streaming == "blocks":
        on_gpu_blocks = min(arch.num_blocks, o.resident_blocks + 2)
        est.host_gib = (arch.num_blocks - min(o.resident_blocks, arch.num_blocks)) * block / GIB
    weights = on_gpu_blocks * block + arch.non_block_params * db
    est.parts["weights"] = weights / GIB
    if o.finetune == "lora":
        targets = set(o.lora_targets)
        lora = arch.num_blocks * sum(o.lora_rank * (lin.in_features + lin.out_features) for lin in arch.block_linears
                                     if any(lin.name == t or lin.name.endswith("." + t) for t in targets))
        est.parts["LoRA"] = lora * 4 / GIB
        est.parts["grads"] = lora * 4 / GIB
        est.parts["optimizer"] = lora * (2 if o.optimizer_8bit else 8) / GIB
        if o.extra_adapters:  # e.g. an old-policy adapter kept beside the trained one (fp32, no grads)
            est.parts["extra adapters"] = o.extra_adapters * lora * 4 / GIB
    else:
        n = arch.num_blocks * arch.block_params + arch.non_block_params
        est.parts["grads"] = n * db / GIB
        est.parts["optimizer"] = n * (2 if o.optimizer_8bit else 2 * db) / GIB
        if o.kl_reference:
            est.parts["reference copy"] = n * db / GIB  # a frozen copy: shard it (FSDP2/ZeRO-3) on real cards
    quantised = o.base_storage != "none"
    held, transient = 0.0, 0.0
    for images in o.step_graphs():
        h, t = _activation_bytes(arch, o, images, quantised)
        held, transient = held + h, max(transient, t)
    est.parts["activations"] = (held + transient) / GIB
    vae_params = arch.vae_params or VAE_PARAMS
    if o.buffer_images:  # x0 of a forward-process objective's rollout buffer (packed latents, 64 channels)
        est.parts["x0 buffer"] = o.buffer_images * (o.resolution // 16) ** 2 * 64 * db / GIB
    if o.decodes_rollouts:
        est.parts["VAE"] = vae_params * db / GIB  # decodes rollouts for the rewards
    est.parts["context"] = CONTEXT_GIB
    te_bytes = 1 if o.text_encoder_storage in ("fp8", "int8") else db
    est.caching = {"text encoder": (arch.text_encoder_params or TEXT_ENCODER_PARAMS) * te_bytes / GIB,
                   "VAE": vae_params * db / GIB,
                   "encoding": 1.0, "context": CONTEXT_GIB}
    return est


def device_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def report_estimate(config) -> Estimate:
    """Print the estimate (local main process), warn when it exceeds the GPU; exit 0 after it with ``estimate_only``."""
    est = estimate(Options.from_config(config), architecture_of(config))
    if getattr(config, "local_process_index", 0) == 0:
        print("\n".join(est.lines()), flush=True)
        total = device_gib()
        if total is not None and est.peak_gib > total:
            logger.warning("the estimated peak (%.1f GiB) exceeds this GPU (%.1f GiB): see docs/low-vram.md for options "
                           "that fit (base_storage, weight_streaming, optim=adamw_8bit)", est.peak_gib, total)
    if config.estimate_only:
        raise SystemExit(0)
    return est


# ----------------------------------------------------------------------------------------------- README table
# Every low-VRAM row caches with an fp8 text encoder (bf16 it alone takes 15.4 GiB while caching).
_TE = dict(text_encoder_storage="fp8")
TABLE_OPTIONS = (
    ("bf16", dict()),
    ("fp8", dict(base_storage="fp8", **_TE)),
    ("int8", dict(base_storage="int8", **_TE)),
    ("nf4", dict(base_storage="nf4", **_TE)),
    ("nf4 + 8-bit AdamW", dict(base_storage="nf4", optimizer_8bit=True, **_TE)),
    ("fp8 + streaming (8 resident)", dict(base_storage="fp8", weight_streaming="blocks", resident_blocks=8, **_TE)),
    ("nf4 + streaming (8 resident)", dict(base_storage="nf4", weight_streaming="blocks", resident_blocks=8, **_TE)),
)
CARDS_GB = (24, 48, 80)
# Targets the issue set (estimated, 1024², bs1, LoRA r16): (objective, card GB, options that must fit).
TARGETS = (
    ("sft", 24, ("nf4", "fp8 + streaming (8 resident)")),
    ("sft", 48, ("fp8",)),
    ("dpo", 24, None),
    ("grpo", 24, None),
    ("dpo+grpo", 24, None),
)


def table(resolution: int = 1024, rank: int = 16) -> tuple[list[str], dict]:
    from .configs import DEFAULT_LORA_TARGETS

    base = Options(lora_rank=rank, lora_targets=tuple(DEFAULT_LORA_TARGETS), resolution=resolution)
    results: dict[tuple[str, str], float] = {}
    header = "| option | " + " | ".join(o.upper() if o != "dpo+grpo" else "DPO+GRPO" for o in OBJECTIVES) + " |"
    rows = [header, "|" + "---|" * (len(OBJECTIVES) + 1)]
    for label, kw in TABLE_OPTIONS:
        cells = []
        for obj in OBJECTIVES:
            est = estimate(replace(base, objective=obj, kl_reference=obj != "sft", **kw))
            results[(label, obj)] = est.peak_gib
            fits = [c for c in CARDS_GB if est.peak_gib * GIB <= c * 1e9]
            cells.append(f"{est.peak_gib:.1f} ({fits[0]} GB)" if fits else f"{est.peak_gib:.1f} (>80 GB)")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows, results


def target_lines(results: dict) -> list[str]:
    out = []
    for obj, card, labels in TARGETS:
        candidates = labels or tuple(label for label, _ in TABLE_OPTIONS)
        best = min(candidates, key=lambda label: results[(label, obj)])
        met = all(results[(label, obj)] * GIB <= card * 1e9 for label in candidates) if labels else results[(best, obj)] * GIB <= card * 1e9
        which = " and ".join(labels) if labels else f"best option ({best})"
        values = ", ".join(f"{label} {results[(label, obj)]:.1f} GiB" for label in (labels or (best,)))
        out.append(f"{obj.upper()} <= {card} GB with {which}: {values} -> {'met' if met else 'NOT met'}")
    return out


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Print the README memory table (estimated peak GiB; smallest card that fits).")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    rows, results = table(args.resolution, args.rank)
    print(f"Estimated peak GPU memory, GiB (smallest of {'/'.join(map(str, CARDS_GB))} GB that fits), LoRA r{args.rank}, "
          f"{args.resolution}², batch 1, {Options().text_tokens} text tokens, gradient checkpointing; every row but bf16 "
          "caches with text_encoder_storage=fp8 (peak = max(caching, training step)):")
    print("\n".join(rows))
    print()
    print("\n".join(target_lines(results)))


if __name__ == "__main__":
    main()
