"""The complete Qwen-Image model bundle on diffusers and transformers classes.

Attributes load lazily (PEP 562): ``qwen_image.errors``, ``qwen_image.images`` and ``qwen_image.jsonl`` are the
project's lowest layer (the user-error type, the image converter and the JSON Lines reader that ``rewards/`` and
``annotation/`` share), and importing them must not pull in torch and diffusers.
"""

from __future__ import annotations

from .lazy import lazy_exports

_EXPORTS = {
    "QwenImageInputError": "errors", "UserError": "errors",
    "check_size": "latents", "pack": "latents", "unpack": "latents",
    "QwenImage": "model", "resolve_dtype": "model",
    "QwenImage21": "qwen_image_21",
    "Conditioning": "sampling", "References": "sampling", "SampleOutput": "sampling",
    "predict_velocity": "sampling", "sample": "sampling", "sde_step": "sampling",
    "QWEN_IMAGE_SCHEDULER_CONFIG": "scheduler", "inference_sigmas": "scheduler", "make_scheduler": "scheduler",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
