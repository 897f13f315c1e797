"""VAE reconstruction quality (PSNR / SSIM, torchmetrics) on text images, as in Qwen-Image's Table 2.

    metrics = reconstruction_metrics(images, model=QwenImage.from_pretrained(...))   # or encode=, decode=
    metrics["psnr"], metrics["ssim"], metrics["per_image"]

Synthetic text images from :mod:`align.datatools.synthesis` make a ready-made text-rich test set.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from qwen_image.images import to_rgb

__all__ = ["to_tensor", "psnr", "ssim", "reconstruction_metrics"]


def to_tensor(images: Sequence[Any], size: tuple[int, int] | None = None, pixel_range: tuple[float, float] = (0.0, 1.0)):
    """PIL images / arrays / a tensor -> float32 tensor (B, 3, H, W) in [0, 1].

    ``size`` = (width, height) resizes PIL inputs (bicubic). Tensors / arrays are taken as (B, 3, H, W) or
    (B, 3, 1, H, W) (channels-first) or (B, H, W, 3), in ``pixel_range`` (e.g. (-1, 1) for raw VAE output).
    """
    import torch

    if isinstance(images, torch.Tensor) or isinstance(images, np.ndarray):
        t = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images).float()
        if t.dim() == 5:
            t = t[:, :, 0]
        if t.dim() == 4 and t.shape[1] not in (1, 3) and t.shape[-1] in (1, 3):
            t = t.permute(0, 3, 1, 2)
        lo, hi = pixel_range
        return ((t - lo) / (hi - lo)).clamp(0, 1)
    arrs = []
    for im in images:
        if not isinstance(im, Image.Image):
            return to_tensor(torch.stack([torch.as_tensor(np.asarray(x)) for x in images]), size, pixel_range)
        im = to_rgb(im)
        if size is not None and im.size != tuple(size):
            im = im.resize(tuple(size), Image.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def psnr(preds, target, data_range: float = 1.0) -> list[float]:
    """Per-image PSNR in dB (torchmetrics); ``inf`` for identical images. Inputs (B, 3, H, W) in [0, data_range]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    v = peak_signal_noise_ratio(preds.double(), target.double(), data_range=data_range, reduction="none",
                                dim=(1, 2, 3))
    return [float(x) for x in v.reshape(-1)]


def ssim(preds, target, data_range: float = 1.0) -> list[float]:
    """Per-image SSIM (torchmetrics, Gaussian window 11, sigma 1.5) in [-1, 1]; 1 for identical images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    v = structural_similarity_index_measure(preds.double(), target.double(), data_range=data_range, reduction="none")
    return [float(x) for x in v.reshape(-1)]


def _mean(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    if any(math.isinf(x) for x in xs):
        return float("inf")
    return float(sum(xs) / len(xs))


def reconstruction_metrics(images: Sequence[Image.Image], encode: Callable | None = None, decode: Callable | None = None,
                           model: Any = None, size: tuple[int, int] | None = None, batch_size: int = 4,
                           pixel_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Encode then decode each image and compare with the input: ``{"psnr", "ssim", "n", "per_image"}``.

    Either ``model`` (an object with ``encode_images(images, height, width)`` and ``decode_latents(latents)``,
    e.g. ``qwen_image.QwenImage``) or the callables ``encode(images) -> latents`` and ``decode(latents) -> images``
    (PIL images, or a tensor in ``pixel_range``). ``size`` = (width, height) resizes the inputs first (needed with
    a model: sides must be multiples of 16); the images are compared at that size. Means: PSNR is the mean of
    per-image PSNR in dB (inf if any image is reconstructed exactly), SSIM the mean per-image SSIM.
    """
    images = list(images)
    if not images:
        raise ValueError("no images")
    if model is not None:
        if encode is not None or decode is not None:
            raise ValueError("give model or encode/decode, not both")

        def encode(batch):
            w, h = batch[0].size
            return model.encode_images(batch, height=h, width=w)

        def decode(latents):
            return model.decode_latents(latents)
    if encode is None or decode is None:
        raise ValueError("need encode and decode callables (or model=)")
    if size is None:
        size = images[0].size
    src = [to_rgb(im).resize(tuple(size), Image.BICUBIC) if im.size != tuple(size) else to_rgb(im)
           for im in images]
    per_psnr: list[float] = []
    per_ssim: list[float] = []
    for s in range(0, len(src), batch_size):
        batch = src[s:s + batch_size]
        rec = decode(encode(batch))
        target = to_tensor(batch)
        pred = to_tensor(rec, size=None, pixel_range=pixel_range)
        if pred.shape != target.shape:
            raise ValueError(f"reconstruction has shape {tuple(pred.shape)}, input {tuple(target.shape)}")
        per_psnr += psnr(pred, target)
        per_ssim += ssim(pred, target)
    return {"psnr": _mean(per_psnr), "ssim": _mean(per_ssim), "n": len(src),
            "per_image": [{"psnr": p, "ssim": q} for p, q in zip(per_psnr, per_ssim)]}
