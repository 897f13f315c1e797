"""LoRA files in for training (``init_adapter``, the reference of a resumed adapter): the conversion of diffusers,
ComfyUI, ai-toolkit, kohya/musubi and DiffSynth files lives in :mod:`qwen_image.lora`, so ``QwenImage.load_lora``
reads the same files the same way; this module names the option in its errors and makes them ``UserError``s."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_image.errors import QwenImageInputError, UserError
from qwen_image.lora import LORA_WEIGHT_NAME
from qwen_image.lora import load_lora_file as _load_lora_file

__all__ = ["LORA_WEIGHT_NAME", "load_lora_file"]


def load_lora_file(transformer: torch.nn.Module, path: str | Path, adapter_name: str) -> dict:
    """:func:`qwen_image.lora.load_lora_file` for ``init_adapter``: returns the adapter's LoraConfig kwargs."""
    try:
        return _load_lora_file(transformer, path, adapter_name, what="init_adapter")
    except QwenImageInputError as err:
        raise UserError(str(err)) from None
