"""One image-to-RGB conversion for everything that reads images for training or data tools.

``Image.convert("RGB")`` alone silently breaks several common files: 16-bit greyscale PNGs (modes ``I;16``/``I``)
are clipped to 255 and train as pure white, transparent pixels keep whatever colour the encoder left behind
(often black), and EXIF-rotated phone photos are used sideways. :func:`to_rgb` handles those cases.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

__all__ = ["to_rgb", "to_rgba"]

BACKGROUND = (255, 255, 255)  # what transparent pixels become (the usual "paper" behind a logo or sticker)


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    arr = np.asarray(image)
    if image.mode == "F":
        # Float images: [0, 1] is the common convention; anything larger is taken as 8-bit-ranged values.
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        arr = np.nan_to_num(arr.astype(np.float64) * scale)
    else:
        # I;16* hold 0..65535; Pillow's "I" is how 16-bit data arrives after most conversions: same range.
        arr = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """An 8-bit RGB copy of ``image``: EXIF orientation applied, 16-bit/32-bit greyscale scaled (not clipped),
    palette/alpha images composited on ``background``, CMYK and other modes converted."""
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_l(image).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_rgba(image: Image.Image) -> Image.Image:
    """An 8-bit RGBA copy of ``image`` for an RGBA VAE (Qwen-Image-2.1): images with transparency keep their alpha
    (EXIF orientation applied), every other image is :func:`to_rgb`'s conversion with an opaque alpha."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("RGBA", "LA", "La", "PA", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    return to_rgb(image).convert("RGBA")
