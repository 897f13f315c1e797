"""The Qwen-Image-2.1 family (``model_family: qwen-image-2.1``): the 7.1 B single-stream transformer with the
Qwen3-VL text encoder and the RGBA VAE (:class:`qwen_image.qwen_image_21.QwenImage21`).

What differs from Qwen-Image is carried by the bundle (velocity call, sizes, sigmas) and declared here: LoRA on the
seven block Linears, ``QwenImage21TransformerBlock`` as the repeated block, the estimator's architecture (with the
activation width measured on a real-size 2.1 block, ``benchmarks/qwen_image_21_block.py``), sizes in multiples of
32 px. Exported adapters use the same keys as Qwen-Image's (``transformer.<module>.lora_A/B.weight``):
``QwenImage21Pipeline`` shares Qwen-Image's LoRA loader.

2.1 does text-to-image and editing with one checkpoint, so whether a job is an edit cannot be read from the
weights: ``tiny_variant: edit`` says so for the tiny model, ``model_family: qwen-image-2.1-edit`` for a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qwen_image.errors import UserError

from . import ModelFamily, register_model_family
from .architecture import Architecture, LinearShape

# Tensors of width inner_dim one 2.1 block saves for backward per token (LoRA r16 on the seven Linears, bf16, no
# checkpointing), measured by benchmarks/qwen_image_21_block.py at 1024² px + 128 text tokens (Qwen-Image: 34.5).
ACT_WIDTHS_PER_TOKEN_21 = 42.17
TINY_VARIANTS = ("t2i", "edit")


class QwenImage21Family(ModelFamily):
    name = "qwen-image-2.1"
    edit_jobs = False  # the -edit family: every job of a checkpoint is an edit

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        from qwen_image.qwen_image_21 import LORA_TARGETS_21

        return tuple(LORA_TARGETS_21)

    def _variant(self, config: Any) -> str:
        variant = getattr(config, "tiny_variant", "t2i")
        if variant not in TINY_VARIANTS:
            raise UserError(f"tiny_variant must be t2i or edit for {self.name}, got {variant!r}")
        return variant

    def load(self, config: Any, dtype: torch.dtype, load_text_encoder: bool = True, load_vae: bool = True) -> Any:
        from qwen_image.qwen_image_21 import SIZE_MULTIPLE, QwenImage21

        if config.resolution % SIZE_MULTIPLE:
            raise UserError(f"resolution must be a multiple of {SIZE_MULTIPLE} px for Qwen-Image-2.1, got "
                            f"{config.resolution}")
        if config.model_name_or_path:
            return QwenImage21.from_pretrained(config.model_name_or_path, torch_dtype=dtype,
                                               load_text_encoder=load_text_encoder, load_vae=load_vae,
                                               edit_model=self.is_edit(config))
        return QwenImage21.tiny(seed=config.tiny_seed, dtype=dtype, edit=self.is_edit(config))

    def is_edit(self, config: Any) -> bool:
        if self.edit_jobs:
            return True
        return not config.model_name_or_path and self._variant(config) == "edit"

    def identity(self, config: Any) -> str:
        # The family name keeps 2.1's caches apart from Qwen-Image's tiny model of the same seed.
        if config.model_name_or_path:
            return str(Path(config.model_name_or_path).resolve())
        return f"{self.name}-tiny-seed{config.tiny_seed}"

    def block_class(self) -> type:
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21TransformerBlock

        return QwenImage21TransformerBlock

    def architecture(self, config: Any) -> Architecture:
        from qwen_image.qwen_image_21 import architecture_21

        path = getattr(config, "model_name_or_path", None)
        return architecture_from_21(architecture_21(path if path and Path(path).is_dir() else None))


class QwenImage21EditFamily(QwenImage21Family):
    name = "qwen-image-2.1-edit"
    edit_jobs = True


def architecture_from_21(arch) -> Architecture:
    """``qwen_image.qwen_image_21.Architecture21`` as the estimator's record, with 2.1's activation width, text
    encoder (the whole Qwen3-VL, as it loads for caching) and VAE."""
    return Architecture(
        num_blocks=arch.num_blocks, inner_dim=arch.inner_dim,
        block_linears=tuple(LinearShape(*lin) for lin in arch.block_linears),
        block_other_params=arch.block_other_params, non_block_params=arch.non_block_params,
        grad_weight_params=arch.grad_weight_params, act_widths_per_token=ACT_WIDTHS_PER_TOKEN_21,
        text_encoder_params=float(arch.text_encoder_params), vae_params=float(arch.vae_params),
    )


register_model_family(QwenImage21Family())
register_model_family(QwenImage21EditFamily())
