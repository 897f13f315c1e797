"""Model set-up for training: load the bundle, add a LoRA adapter (PEFT) or unfreeze for full fine-tuning."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from qwen_image import QwenImage
from qwen_image.model import resolve_dtype

from .adapters import load_lora_file
from .configs import QwenImageTrainingConfig

logger = logging.getLogger(__name__)
ADAPTER_NAME = "default"


def training_dtype(config: QwenImageTrainingConfig) -> torch.dtype:
    if config.model_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and config.model_name_or_path else torch.float32
    return resolve_dtype(config.model_dtype)


def load_qwen_image(
    config: QwenImageTrainingConfig, load_text_encoder: bool = True, load_vae: bool = True
) -> QwenImage:
    """The bundle named by the config (a local checkpoint, or the tiny random model when none is given)."""
    dtype = training_dtype(config)
    with _no_zero3_init(config):
        if config.model_name_or_path:
            return QwenImage.from_pretrained(
                config.model_name_or_path, torch_dtype=dtype, load_text_encoder=load_text_encoder, load_vae=load_vae
            )
        return QwenImage.tiny(seed=config.tiny_seed, dtype=dtype)


@contextlib.contextmanager
def _no_zero3_init(config: QwenImageTrainingConfig):
    """While a ZeRO-3 TrainingArguments is alive, transformers builds models under deepspeed.zero.Init: the text
    encoder would come out partitioned and unusable outside an engine. The encoders run whole (caching); the Trainer
    partitions the transformer itself."""
    hf_config = getattr(config, "hf_deepspeed_config", None)
    if hf_config is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_config)


def model_identity(config: QwenImageTrainingConfig) -> str:
    """A string that changes when the weights that produce cached embeddings/latents change."""
    if config.model_name_or_path:
        return str(Path(config.model_name_or_path).resolve())
    return f"tiny-seed{config.tiny_seed}"


def lora_config(config: QwenImageTrainingConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights=True if config.lora_init in ("true", "True", "default") else config.lora_init,
        target_modules=list(config.lora_target_modules),
    )


def add_lora(transformer: torch.nn.Module, config: QwenImageTrainingConfig) -> None:
    """Add a trainable LoRA (or load ``init_adapter`` as the starting point) to a frozen transformer."""
    transformer.requires_grad_(False)
    if config.init_adapter:
        load_adapter_into(transformer, config.init_adapter, trainable=True)
    else:
        targets = set(config.lora_target_modules)
        names = {n.rsplit(".", 1)[-1] for n, _ in transformer.named_modules()} | {n for n, _ in transformer.named_modules()}
        unknown = [t for t in targets if not any(n.endswith(t) for n in names)]
        if unknown:
            raise ValueError(f"lora_target_modules {unknown} match no module of QwenImageTransformer2DModel.")
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
    if getattr(config, "transformer_gradient_checkpointing", False):
        transformer.enable_gradient_checkpointing()
    transformer.train()
    n_train = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in transformer.parameters())
    logger.info("trainable parameters: %s / %s (%.3f%%)", f"{n_train:,}", f"{n_all:,}", 100 * n_train / max(n_all, 1))
    return transformer
