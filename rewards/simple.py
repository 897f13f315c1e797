"""Cheap rewards with no weights: useful to check that a training loop learns anything at all."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from .images import to_pil
from .registry import register_reward

__all__ = ["jpeg_compressibility", "brightness"]


@register_reward("jpeg_compressibility")
def jpeg_compressibility(prompts: list[str], images: list[Image.Image], *, quality: int = 95,
                         **columns: Any) -> list[float | None]:
    """Negative normalised JPEG size: ``-(JPEG bytes at quality 95) / (width * height * 3)``.

    Range [-1, 0] (clipped): higher = more compressible (flatter, simpler images). Independent of the
    resolution, unlike flow_grpo's ``-kB/500``. Prompts are ignored.
    """
    out: list[float | None] = []
    for im in images:
        im = to_pil(im)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(quality))
        raw = im.width * im.height * 3
        out.append(max(-1.0, -buf.tell() / raw))
    return out


@register_reward("brightness")
def brightness(prompts: list[str], images: list[Image.Image], **columns: Any) -> list[float | None]:
    """Mean luminance (ITU-R 601 luma, Pillow's ``"L"`` mode) divided by 255. Range [0, 1]: 0 black, 1 white.

    A learning-check reward: a working GRPO loop should drive it up (or down with a negative weight) fast.
    """
    return [float(np.asarray(to_pil(im).convert("L"), dtype=np.float64).mean() / 255.0) for im in images]
