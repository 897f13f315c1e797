"""Low-VRAM storage of the frozen base: weight-only quantisation (torchao fp8/int8, bitsandbytes nf4) and block
weight streaming that stays correct in backward. ``align.modeling`` is the only caller; docs/low-vram.md says which
option fits which card.

Two traps shape this module (both measured, both tested):

- Weight-only quantisation saves nothing in training without gradient checkpointing: autograd keeps every block's
  de-quantised full-precision weights for backward. So a quantised or streamed base always trains with block
  checkpointing (``prepare_transformer`` switches it on and says so).
- Offloading with forward hooks alone is wrong in backward (diffusers' group offloading: NaN/inf gradients unless
  block-level AND checkpointed). ``BlockStreamer`` fetches a block's weights in the block's forward pre-hook and drops
  them after its forward; with block checkpointing the backward recomputes the block, which calls the hooks again, so
  backward always sees the real weights. It streams the tensor subclasses torchao and bitsandbytes store (diffusers'
  offloading copies ``param.data`` and cannot), and it can keep the first ``resident`` blocks on the GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Sequence

import torch
from torch import nn

from qwen_image.errors import UserError

logger = logging.getLogger(__name__)

BASE_STORAGES = ("none", "fp8", "int8", "nf4")
TEXT_ENCODER_STORAGES = ("none", "fp8", "int8")
WEIGHT_STREAMING = ("none", "blocks")


# ----------------------------------------------------------------------------------------------- options
def _distributed_backend(config) -> str | None:
    """'fsdp' / 'deepspeed' when the run shards parameters (from the TrainingArguments or `accelerate launch`)."""
    if getattr(config, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return "fsdp"
    if getattr(config, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        return "deepspeed"
    return None


def validate_memory_options(config) -> None:
    """Reject combinations that cannot work, with one line each (called from the config's ``__post_init__``)."""
    for name, allowed in (("base_storage", BASE_STORAGES), ("text_encoder_storage", TEXT_ENCODER_STORAGES),
                          ("weight_streaming", WEIGHT_STREAMING)):
        if getattr(config, name) not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}; got {getattr(config, name)!r}.")
    if config.resident_blocks < 0:
        raise UserError(f"resident_blocks must be >= 0, got {config.resident_blocks}.")
    if config.finetune == "full" and config.base_storage != "none":
        raise UserError(f"base_storage={config.base_storage} needs finetune=lora: a quantised base is frozen "
                         "(full fine-tuning would train the quantised weights).")
    if config.finetune == "full" and config.weight_streaming != "none":
        raise UserError("weight_streaming=blocks streams frozen weights; full fine-tuning trains them (use FSDP2/ZeRO-3 "
                         "with CPU offload instead).")
    if config.base_storage == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("base_storage=nf4 needs bitsandbytes: pip install bitsandbytes==0.50.2")
    for name in ("base_storage", "text_encoder_storage"):
        if getattr(config, name) in ("fp8", "int8") and importlib.util.find_spec("torchao") is None:
            raise UserError(f"{name}={getattr(config, name)} needs torchao: pip install torchao==0.18.0")
    backend = _distributed_backend(config)
    if backend and config.weight_streaming != "none":
        raise UserError(f"weight_streaming=blocks cannot run under {backend}: it shards the same weights the streamer "
                         "moves; use a single process or DDP (or the backend's own CPU offload).")
    if backend and config.base_storage != "none":
        raise UserError(f"base_storage={config.base_storage} cannot run under {backend} here (quantised weights are "
                         "not shardable by it); use a single process or DDP.")


def checkpointing_reason(config) -> str | None:
    """Why this config must train with block gradient checkpointing (None: it is the user's choice)."""
    reasons = []
    if config.base_storage != "none":
        reasons.append(f"base_storage={config.base_storage}")
    if config.weight_streaming != "none":
        reasons.append(f"weight_streaming={config.weight_streaming}")
    return " and ".join(reasons) or None


# ----------------------------------------------------------------------------------------------- quantisation
def _plain_linear(module: nn.Module, fqn: str = "") -> bool:
    # Exactly nn.Linear: PEFT LoRA layers and already quantised layers are left alone.
    return type(module) is nn.Linear


def quantize_linears(module: nn.Module, storage: str, compute_dtype: torch.dtype, nested: bool = False) -> nn.Module:
    """Quantise every plain ``nn.Linear`` weight of ``module`` in place (biases stay in their dtype).

    fp8 / int8: torchao weight-only (``Float8WeightOnlyConfig`` / ``Int8WeightOnlyConfig``; de-quantised to the
    activation dtype in each matmul). nf4: bitsandbytes ``Linear4bit`` swapped in here (diffusers' loader refuses
    without a GPU), quantised where the module lives when this runs (blocks of 64, fp32 scales; ``nested`` quantises
    the scales too).
    """
    if storage == "none":
        return module
    if storage in ("fp8", "int8"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        quantize_(module, Float8WeightOnlyConfig() if storage == "fp8" else Int8WeightOnlyConfig(), filter_fn=_plain_linear)
        return module
    if storage == "nf4":
        import bitsandbytes as bnb

        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if not _plain_linear(child):
                    continue
                device = child.weight.device
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=nested, quant_type="nf4",
                                      device="meta")  # no random init: the weight is replaced right away
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=nested)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place the first time the layer runs in
                # eval mode without grad (evaluation, rollouts): a faster inference layout that needs in_features to
                # be a multiple of the 64-value block (tiny models are not) and that changes the stored bytes under
                # the trainer's feet. Keep one layout on every machine.
                q.support_avx512bf16_for_cpu = False
                setattr(parent, name, q.to(device))  # Params4bit quantises on .to()
        return module
    raise UserError(f"unknown storage {storage!r}; use one of {', '.join(BASE_STORAGES)}.")


def quantize_transformer_blocks(transformer: nn.Module, storage: str, compute_dtype: torch.dtype,
                                device: torch.device | str, nested: bool = False) -> None:
    """Quantise the transformer blocks one at a time on ``device`` (fast; GPU peak: one full-precision block) and put
    each back in CPU memory: the GPU stays free for caching, then the Trainer (or the streamer) places the blocks.
    Non-block layers (embeddings, norms, output projection: 0.2% of the weights) keep the model dtype."""
    device = torch.device(device)
    for block in transformer.transformer_blocks:
        block.to(device)
        quantize_linears(block, storage, compute_dtype, nested)
        if device.type != "cpu":
            block.to("cpu")
    logger.info("transformer blocks stored as %s%s", storage, " (nested scales)" if nested and storage == "nf4" else "")


def quantize_text_encoder(text_encoder: nn.Module, storage: str) -> None:
    """Weight-only quantise the text encoder's Linear layers for caching (its output head is never used)."""
    if storage == "none" or text_encoder is None:
        return
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    cfg = Float8WeightOnlyConfig() if storage == "fp8" else Int8WeightOnlyConfig()
    quantize_(text_encoder, cfg, filter_fn=lambda m, fqn: _plain_linear(m) and not fqn.endswith("lm_head"))
    logger.info("text encoder stored as %s for caching", storage)


def storage_bytes(module: nn.Module) -> int:
    """Bytes the parameters and buffers of ``module`` occupy, counting the inner tensors of torchao / bitsandbytes
    subclasses (and the nf4 scales) rather than their logical size."""
    total = 0
    seen: set[int] = set()
    for t in list(module.parameters()) + list(module.buffers()):
        total += tensor_bytes(t, seen)
    return total


def tensor_bytes(t: torch.Tensor, seen: set[int] | None = None) -> int:
    seen = set() if seen is None else seen
    if hasattr(t, "__tensor_flatten__"):  # torchao subclass: sum its inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), seen) for n in names)
    n = 0
    quant_state = getattr(t, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit: packed bytes + absmax (+ nested state)
        for name in ("absmax", "code"):
            v = getattr(quant_state, name, None)
            if torch.is_tensor(v):
                n += tensor_bytes(v, seen)
        nested = getattr(quant_state, "state2", None)
        if nested is not None:
            for name in ("absmax", "code"):
                v = getattr(nested, name, None)
                if torch.is_tensor(v):
                    n += tensor_bytes(v, seen)
    try:
        key = t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - tensors without storage
        return n
    if key in seen and key != 0:
        return n
    seen.add(key)
    return n + t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------- streaming
class BlockStreamer:
    """Frozen weights of ``blocks[resident:]`` live in (pinned) CPU memory; each block's weights come to ``device`` in
    its forward pre-hook and are dropped (an empty placeholder takes their place) after its forward.

    Correct in backward only with block gradient checkpointing (the recompute re-fetches). Without it autograd would
    keep every fetched block alive (correct, but nothing saved), so ``prepare_transformer`` enforces checkpointing.
    Trainable parameters (names with ``lora_``) are never streamed. The copy is synchronous on the current stream,
    from pinned memory when CUDA is present: simple and ordered; overlapping it with compute is future work.
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, resident: int = 0):
        self.device = torch.device(device)
        self.entries: dict[int, list[tuple[nn.Module, str, torch.Tensor, nn.Parameter]]] = {}
        self.fetches = 0
        self._fetched: set[int] = set()
        self._blocks: dict[int, nn.Module] = {}
        self._handles = []
        pin = torch.cuda.is_available()
        for i, block in enumerate(blocks):
            if i < resident:
                block.to(self.device)
                continue
            entries = []
            for mod_name, mod in block.named_modules():
                for name, p in list(mod._parameters.items()):
                    if p is None or "lora_" in f"{mod_name}.{name}":
                        continue
                    # Keep the Parameter itself (bitsandbytes keeps its quantisation state on it).
                    master = p if p.device.type == "cpu" else p.to("cpu")
                    if pin and type(master) in (torch.Tensor, nn.Parameter):
                        try:
                            master = nn.Parameter(master.detach().pin_memory(), requires_grad=False)
                        except Exception:  # noqa: BLE001 - some tensor subclasses cannot be pinned
                            pass
                    placeholder = nn.Parameter(torch.empty(0, dtype=p.dtype, device=self.device), requires_grad=False)
                    mod._parameters[name] = placeholder
                    entries.append((mod, name, master, placeholder))
            self.entries[id(block)] = entries
            self._blocks[id(block)] = block
            self._handles.append(block.register_forward_pre_hook(self._fetch))
            self._handles.append(block.register_forward_hook(self._release))
        if pin:
            torch.cuda.empty_cache()

    @property
    def streamed_blocks(self) -> int:
        return len(self.entries)

    def _fetch(self, block: nn.Module, args) -> None:
        # The recompute in backward may stop before the block's forward ends (torch.utils.checkpoint's early stop),
        # so the forward hook does not always run: drop any block still fetched before fetching the next one.
        for other in list(self._fetched):
            if other != id(block):
                self._release(self._blocks[other], None, None)
        for mod, name, master, _ in self.entries[id(block)]:
            weight = master.to(self.device, non_blocking=True)
            if not isinstance(weight, nn.Parameter):
                weight = nn.Parameter(weight, requires_grad=False)
            mod._parameters[name] = weight
        self._fetched.add(id(block))
        self.fetches += 1

    def _release(self, block: nn.Module, args, output) -> None:
        for mod, name, _, placeholder in self.entries[id(block)]:
            mod._parameters[name] = placeholder
        self._fetched.discard(id(block))

    def release_all(self) -> None:
        """Drop every fetched block (e.g. the last one a backward recomputed, before the optimizer step)."""
        for other in list(self._fetched):
            self._release(self._blocks[other], None, None)

    def remove(self) -> None:
        """Put every weight back on the device and drop the hooks."""
        for h in self._handles:
            h.remove()
        for entries in self.entries.values():
            for mod, name, master, _ in entries:
                weight = master.to(self.device)
                mod._parameters[name] = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.entries.clear()
