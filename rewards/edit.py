"""Offline rewards for edits (Qwen-Image-Edit-2509 / 2511), with the signature every reward has.

* ``edit_ocr`` (:class:`EditTextReward`): is the *requested* text in the edited image? The target is the ``text``
  column, else read from the instruction: 'replace "Latte" with "拿铁"' asks for "拿铁" (the last quoted segment
  of a replace/change instruction), 'add the words "SALE"' for "SALE". Range [0, 1]; None without a target.
* ``edit_consistency`` (:class:`SourceConsistency`): is the rest of the image still the source? SSIM (range
  [-1, 1], 1 = identical) or PSNR (dB, capped at ``max_psnr``) between the edit and the source image, over the
  pixels outside ``mask`` (white = the region the edit may change) or the whole image without a mask.

Both read per-sample columns: the source from ``source`` / ``control_image`` / ``control_images`` (first image
of the list), the mask from ``mask``; values may be PIL images, paths, or ``datasets`` image dicts.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .images import to_pil
from .ocr import OcrReward
from .registry import register_reward
from .text import extract_quoted_text

__all__ = ["EditTextReward", "SourceConsistency", "requested_text", "source_images"]

# "replace X with Y", "change X to Y", "把 X 改成/换成/替换为 Y": the wanted text is the last quoted segment.
_REPLACE = re.compile(r"\b(replace|change|swap|turn|rename|rewrite)\b|改成|改为|换成|替换|改写", re.IGNORECASE)
SOURCE_COLUMNS = ("source", "control_image", "control_images")


def requested_text(instruction: str) -> str | None:
    """The text an edit instruction asks to appear: the last quoted segment of a replace-style instruction,
    else every quoted segment joined by a space; None when nothing is quoted."""
    segments = extract_quoted_text(instruction or "")
    if not segments:
        return None
    if len(segments) > 1 and _REPLACE.search(instruction):
        return segments[-1]
    return " ".join(segments)


def _open(value: Any) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, (list, tuple)):
        return _open(value[0]) if value else None
    return to_pil(value)


def source_images(n: int, columns: dict) -> list[Image.Image | None]:
    """Each sample's source image from the first source column present (None where a row has none)."""
    for name in SOURCE_COLUMNS:
        if columns.get(name) is not None:
            values = list(columns[name])
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} values for {n} images")
            return [_open(v) for v in values]
    raise ValueError(f"edit_consistency needs the source image: pass one of the columns {list(SOURCE_COLUMNS)}")


class EditTextReward:
    """OCR accuracy of the requested text (see the module doc); options as :class:`rewards.OcrReward`."""

    def __init__(self, **ocr_options: Any):
        self.ocr = OcrReward(**ocr_options)

    def __call__(self, prompts: list[str], images: list[Image.Image], text: Sequence[str | None] | None = None,
                 **columns: Any) -> list[float | None]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        targets = [t if t else requested_text(p) for p, t in zip(prompts, text or [None] * len(prompts))]
        rows = [i for i, t in enumerate(targets) if t]
        out: list[float | None] = [None] * len(prompts)
        if rows:
            scores = self.ocr([prompts[i] for i in rows], [images[i] for i in rows], text=[targets[i] for i in rows])
            for i, score in zip(rows, scores):
                out[i] = score
        return out


class SourceConsistency:
    """SSIM or PSNR of the edit against the source outside the edit mask (see the module doc).

    ``metric``: "ssim" (torchmetrics' Gaussian-window SSIM map, averaged over unmasked pixels) or "psnr" (over
    unmasked pixels, capped at ``max_psnr`` dB for identical images). The source is resized to the edit's size.
    """

    def __init__(self, metric: str = "ssim", max_psnr: float = 50.0):
        if metric not in ("ssim", "psnr"):
            raise ValueError(f"metric must be 'ssim' or 'psnr', got {metric!r}")
        self.metric, self.max_psnr = metric, float(max_psnr)

    def __call__(self, prompts: list[str], images: list[Image.Image], mask: Sequence[Any] | None = None,
                 **columns: Any) -> list[float | None]:
        sources = source_images(len(images), columns)
        masks = list(mask) if mask is not None else [None] * len(images)
        out: list[float | None] = []
        for img, src, m in zip(images, sources, masks):
            if src is None:
                out.append(None)
                continue
            img = to_pil(img)
            keep = self._keep(_open(m), img.size)
            if keep is not None and not keep.any():
                out.append(None)  # the mask covers everything: nothing to compare
                continue
            out.append(self.score(img, src.resize(img.size, Image.BICUBIC), keep))
        return out

    @staticmethod
    def _keep(mask: Image.Image | None, size: tuple[int, int]) -> np.ndarray | None:
        if mask is None:
            return None
        return np.asarray(mask.convert("L").resize(size, Image.NEAREST)) < 128  # True = must stay unchanged

    def score(self, image: Image.Image, source: Image.Image, keep: np.ndarray | None) -> float:
        a = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        b = torch.from_numpy(np.asarray(source, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        weight = torch.ones(a.shape[-2:]) if keep is None else torch.from_numpy(keep.astype(np.float32))
        if self.metric == "psnr":
            mse = (((a - b) ** 2).mean(1)[0] * weight).sum() / weight.sum()
            return self.max_psnr if float(mse) == 0 else min(self.max_psnr, -10 * math.log10(float(mse)))
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        kernel = min(11, *(s - (1 - s % 2) for s in a.shape[-2:]))  # odd, at most the image side
        _, ssim_map = ssim(a, b, data_range=1.0, kernel_size=kernel, return_full_image=True)
        ssim_map = ssim_map.mean(1)[0]
        return float((ssim_map * weight).sum() / weight.sum())


register_reward("edit_ocr")(EditTextReward)
register_reward("edit_consistency")(SourceConsistency)
