"""Image-batch conversion shared by the rewards (no torch import unless a tensor is passed)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from qwen_image.images import to_rgb

__all__ = ["to_pil", "to_pil_list"]


def to_pil(image: Any) -> Image.Image:
    """One image as RGB PIL: a PIL image, a path, an HWC/CHW uint8 or float [0, 1] array, or a CHW tensor."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else to_rgb(image)
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        with Image.open(image) as im:
            return to_rgb(im)
    if type(image).__module__.startswith("torch"):
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def to_pil_list(images: Any) -> list[Image.Image]:
    """A batch as a list of RGB PIL images (a list/tuple, an NHWC/NCHW array, or an NCHW float tensor in [0, 1])."""
    if isinstance(images, (list, tuple)):
        return [to_pil(im) for im in images]
    if isinstance(images, Image.Image):
        return [to_pil(images)]
    return [to_pil(im) for im in images]  # first axis of an array / tensor
