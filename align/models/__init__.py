"""The model-family seam: what training needs from a model family, in one small interface, and the registry of
families (``model_family`` in every config; default ``qwen-image``).

A family is a :class:`ModelFamily`: it loads a bundle (a local checkpoint, or its tiny random model for tests and
the CPU demo), says whether a config names an edit model, identifies the weights that produce cached
embeddings, gives the default LoRA targets, the repeated blocks (gradient checkpointing, streaming, FSDP wrap,
quantisation) and their class, the architecture numbers the memory estimator reads, the key prefix of exported
adapters, and places / releases its encoders. The bundle it loads carries the conditioning and the image side
(``conditioning(prompts)`` / edit references, ``encode`` / ``decode_latents``, ``initial_noise``, the scheduler and
the ``transformer``) with the surface of :class:`qwen_image.QwenImage`: an edit model is the case whose
conditioning carries references.

Adding a family: a module with a ``ModelFamily`` subclass and one :func:`register_model_family` call (a module of
the package imported below, or a plugin module named in ``QWEN_IMAGE_ALIGN_PLUGINS``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..plugins import Registry, load_plugins

DEFAULT_FAMILY = "qwen-image"


class ModelFamily:
    """Base class of a model family; subclasses override what differs (see the module docstring)."""

    name: str = ""
    export_prefix: str = "transformer."  # key prefix of saved LoRA files (diffusers' load_lora_weights reads it)
    default_lora_targets: tuple[str, ...] = ()

    # ---- loading
    def load(self, config: Any, dtype: torch.dtype, load_text_encoder: bool = True, load_vae: bool = True) -> Any:
        raise NotImplementedError

    def is_edit(self, config: Any) -> bool:
        """Whether the config names an edit model, known before any weights load (data is checked first)."""
        return False

    def identity(self, config: Any) -> str:
        """A string that changes when the weights that produce cached embeddings / latents change."""
        raise NotImplementedError

    # ---- the transformer
    def repeated_blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.transformer_blocks

    def block_class(self) -> type:
        raise NotImplementedError

    def architecture(self, config: Any):
        """``align.memory.Architecture`` of the config's transformer (the real model when no checkpoint is named)."""
        raise NotImplementedError

    # ---- encoders
    def place_encoders(self, bundle: Any, device: torch.device | str) -> None:
        """Put the text encoder and the VAE on the training device before they encode (the Trainer places the
        transformer)."""
        for module in (bundle.text_encoder, bundle.vae):
            if module is not None:
                module.to(device)

    def release_text_encoder(self, bundle: Any) -> None:
        """Drop the text encoder once everything it must encode is cached."""
        from diffusers.training_utils import free_memory

        bundle.text_encoder = None
        if getattr(bundle, "prompt_encoder", None) is not None:
            bundle.prompt_encoder.text_encoder = None
        free_memory()


# a family class registered again (its module imported twice) is the same family
_FAMILIES: Registry[ModelFamily] = Registry("model family", same=lambda old, new: type(old) is type(new),
                                            option="model_family")


def register_model_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    if not family.name:
        raise ValueError("a model family needs a name")
    return _FAMILIES.register(family.name, family, replace)


def available_model_families() -> list[str]:
    load_plugins()
    return _FAMILIES.names()


def get_model_family(name: str | None) -> ModelFamily:
    name = name or DEFAULT_FAMILY
    if name not in _FAMILIES:
        load_plugins()
    return _FAMILIES.get(name)


def family_of(config: Any) -> ModelFamily:
    return get_model_family(getattr(config, "model_family", None))


from .qwen_image import QwenImageFamily  # noqa: E402  (registers the built-in families)
from .qwen_image_21 import QwenImage21EditFamily, QwenImage21Family  # noqa: E402

__all__ = ["DEFAULT_FAMILY", "ModelFamily", "QwenImage21EditFamily", "QwenImage21Family", "QwenImageFamily",
           "available_model_families", "family_of", "get_model_family", "register_model_family"]
