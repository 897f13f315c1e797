"""Model set-up for training: load the bundle, add a LoRA adapter (PEFT) or unfreeze for full fine-tuning."""

from __future__ import annotations

import logging

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from qwen_image import QwenImage
from qwen_image.errors import UserError
from qwen_image.model import resolve_dtype

from .adapters import load_lora_file
from .configs import QwenImageTrainingConfig
from .lowvram import BlockStreamer, checkpointing_reason, quantize_text_encoder, quantize_transformer_blocks
from .models import family_of

logger = logging.getLogger(__name__)
ADAPTER_NAME = "default"


def training_dtype(config: QwenImageTrainingConfig) -> torch.dtype:
    if config.model_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and config.model_name_or_path else torch.float32
    return resolve_dtype(config.model_dtype)


def load_qwen_image(
    config: QwenImageTrainingConfig, load_text_encoder: bool = True, load_vae: bool = True
) -> QwenImage:
    """The bundle named by the config (its model family's local checkpoint, or the family's tiny random model when
    none is given), stored as the config's memory options say. Every launcher loads through here: it first prints
    the memory estimate (and stops there with ``estimate_only``)."""
    from .memory import report_estimate

    if getattr(config, "local_process_index", 0) == 0:
        print(estimate_subject(config), flush=True)
    report_estimate(config)
    qwen = family_of(config).load(config, training_dtype(config), load_text_encoder, load_vae)
    apply_storage(qwen, config)
    return qwen


def estimate_subject(config: QwenImageTrainingConfig) -> str:
    """Which model the memory estimate that follows is for: the checkpoint's transformer config, or the real
    model of the family when the run names none (a tiny random model needs well under 1 GiB itself)."""
    from pathlib import Path

    from .memory import architecture_of

    arch = architecture_of(config)
    size = (arch.num_blocks * arch.block_params + arch.non_block_params) / 1e9
    path = config.model_name_or_path
    family = family_of(config).name
    if path and (Path(path) / "transformer" / "config.json").is_file():
        return f"memory estimate for the checkpoint {path} ({size:.1f} B transformer parameters, its config.json):"
    if path:
        return f"memory estimate for the real {family} model ({size:.1f} B; {path} has no transformer/config.json):"
    return (f"memory estimate for the real {family} model ({size:.1f} B transformer parameters), not for this run's "
            f"tiny random model (model_name_or_path null), which needs well under 1 GiB:")


def apply_storage(qwen: QwenImage, config: QwenImageTrainingConfig) -> None:
    """Quantise the frozen blocks (on the training device, one block at a time, then back to CPU) and the text encoder as the config says. LoRA is added later, on top (PEFT wraps torchao and bitsandbytes layers)."""
    if config.base_storage != "none":
        quantize_transformer_blocks(qwen.transformer, config.base_storage, training_dtype(config), config.device,
                                    nested=config.use_bnb_nested_quant)
    if qwen.text_encoder is not None:
        quantize_text_encoder(qwen.text_encoder, config.text_encoder_storage)


def place_encoders(qwen: QwenImage, config: QwenImageTrainingConfig) -> None:
    """Put the text encoder and the VAE on the training device for caching (the Trainer places the transformer)."""
    family_of(config).place_encoders(qwen, config.device)


def release_text_encoder(qwen: QwenImage, config: QwenImageTrainingConfig | None = None) -> None:
    """Drop the text encoder once everything it must encode is cached (8 B parameters on the real model)."""
    family_of(config).release_text_encoder(qwen)


def uses_edit_model(config: QwenImageTrainingConfig) -> bool:
    """Whether the config names an edit model, known before any weights load so data can be checked first."""
    return family_of(config).is_edit(config)


def model_identity(config: QwenImageTrainingConfig) -> str:
    """A string that changes when the weights that produce cached embeddings/latents change."""
    return family_of(config).identity(config)


def lora_targets(config: QwenImageTrainingConfig) -> list[str]:
    """The configured LoRA targets, or the model family's default ones."""
    return list(config.lora_target_modules or family_of(config).default_lora_targets)


def lora_config(config: QwenImageTrainingConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights=True if config.lora_init in ("true", "True", "default") else config.lora_init,
        target_modules=lora_targets(config),
    )


def add_lora(transformer: torch.nn.Module, config: QwenImageTrainingConfig) -> None:
    """Add a trainable LoRA (or load ``init_adapter`` as the starting point) to a frozen transformer."""
    transformer.requires_grad_(False)
    if config.init_adapter:
        load_adapter_into(transformer, config.init_adapter, trainable=True)
    else:
        targets = set(lora_targets(config))
        names = {n.rsplit(".", 1)[-1] for n, _ in transformer.named_modules()} | {n for n, _ in transformer.named_modules()}
        unknown = [t for t in targets if not any(n.endswith(t) for n in names)]
        if unknown:
            raise UserError(f"lora_target_modules {unknown} match no module of {type(transformer).__name__}.")
        transformer.add_adapter(lora_config(config), adapter_name=ADAPTER_NAME)
    cast_training_params(transformer, torch.float32)  # LoRA params train in fp32 even on a bf16 base


def load_adapter_into(transformer: torch.nn.Module, path: str, trainable: bool) -> None:
    """Load a LoRA file (diffusers, ComfyUI, kohya, ...; ranks and alphas kept) as the ``default`` adapter."""
    load_lora_file(transformer, path, ADAPTER_NAME)  # any of the formats in docs/adapters.md
    if trainable:
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)


def prepare_transformer(model: QwenImage, config: QwenImageTrainingConfig) -> torch.nn.Module:
    """Make ``model.transformer`` trainable as the config says and return it."""
    transformer = model.transformer
    if config.finetune == "lora":
        add_lora(transformer, config)
    else:
        if config.init_adapter:
            load_adapter_into(transformer, config.init_adapter, trainable=False)
            transformer.fuse_lora()
            transformer.unload_lora()
        transformer.requires_grad_(True)
    reason = checkpointing_reason(config)
    if reason and not getattr(config, "transformer_gradient_checkpointing", False):
        # Without it autograd keeps every block's de-quantised (or fetched) weights for backward: no memory saved.
        logger.info("gradient checkpointing switched on: %s needs it (otherwise backward keeps full-precision "
                    "copies of every block's weights)", reason)
        config.transformer_gradient_checkpointing = True
    if getattr(config, "transformer_gradient_checkpointing", False):
        transformer.enable_gradient_checkpointing()
    if config.weight_streaming == "blocks":
        blocks = family_of(config).repeated_blocks(transformer)
        streamer = BlockStreamer(blocks, config.device, resident=config.resident_blocks)
        transformer._block_streamer = streamer  # kept alive with the model (hooks refer to it)
        logger.info("weight streaming: %d of %d blocks streamed from CPU memory, %d resident",
                    streamer.streamed_blocks, len(blocks), len(blocks) - streamer.streamed_blocks)
    transformer.train()
    n_train = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in transformer.parameters())
    logger.info("trainable parameters: %s / %s (%.3f%%)", f"{n_train:,}", f"{n_all:,}", 100 * n_train / max(n_all, 1))
    return transformer
