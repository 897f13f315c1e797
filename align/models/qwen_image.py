"""The Qwen-Image family: Qwen-Image (and drop-in checkpoints of the same classes such as Qwen-Image-2512) and its
edit models Edit-2509 / Edit-2511, T2I and edit in one family (an edit model's conditioning carries references)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from qwen_image.errors import UserError

from ..configs.base import DEFAULT_LORA_TARGETS
from . import ModelFamily, register_model_family
from .architecture import Architecture, measure_architecture

TRANSFORMER_CLASS = "diffusers:QwenImageTransformer2DModel"
# The modulation Linears act on the timestep embedding, which needs no grad: their weights are not saved.
NO_GRAD_LINEARS = ("_mod.1",)



def qwen_image_architecture(config_json: str | None = None) -> Architecture:
    """The real Qwen-Image transformer (diffusers' default config), or the one of ``config_json``."""
    return measure_architecture(TRANSFORMER_CLASS, config_json, "transformer_blocks", NO_GRAD_LINEARS)


@contextlib.contextmanager
def _no_zero3_init(config: Any):
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


class QwenImageFamily(ModelFamily):
    name = "qwen-image"
    default_lora_targets = tuple(DEFAULT_LORA_TARGETS)

    def load(self, config: Any, dtype: torch.dtype, load_text_encoder: bool = True, load_vae: bool = True) -> Any:
        from qwen_image import QwenImage

        with _no_zero3_init(config):
            if config.model_name_or_path:
                return QwenImage.from_pretrained(config.model_name_or_path, torch_dtype=dtype,
                                                 load_text_encoder=load_text_encoder, load_vae=load_vae)
            variant = getattr(config, "tiny_variant", "t2i")
            if variant != "t2i":
                if not variant.startswith("edit-"):
                    raise UserError(f"tiny_variant must be t2i, edit-2509 or edit-2511, got {variant!r}")
                return QwenImage.tiny_edit(variant.removeprefix("edit-"), seed=config.tiny_seed, dtype=dtype)
            return QwenImage.tiny(seed=config.tiny_seed, dtype=dtype)

    def is_edit(self, config: Any) -> bool:
        from qwen_image.model import is_edit_checkpoint

        if config.model_name_or_path:
            return Path(config.model_name_or_path).is_dir() and is_edit_checkpoint(config.model_name_or_path)
        return getattr(config, "tiny_variant", "t2i") != "t2i"

    def identity(self, config: Any) -> str:
        if config.model_name_or_path:
            return str(Path(config.model_name_or_path).resolve())
        return f"tiny-seed{config.tiny_seed}"

    def block_class(self) -> type:
        from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

        return QwenImageTransformerBlock

    def architecture(self, config: Any) -> Architecture:
        path = getattr(config, "model_name_or_path", None)
        if path:
            cfg = Path(path) / "transformer" / "config.json"
            if cfg.is_file():
                return qwen_image_architecture(cfg.read_text())
        return qwen_image_architecture(None)


register_model_family(QwenImageFamily())
