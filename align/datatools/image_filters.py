"""Image-quality filters from the Qwen-Image data recipe (report §3.2, stages 1-4), as pure functions.

Every metric is a plain function over a PIL image (``laplacian_variance``, ``rms_contrast``, ``mean_luma``,
``perceptual_hash``). Every filter is a small callable object::

    reason = filt(image, row)   # None = keep, otherwise a short human-readable reason string

Filters have a ``name`` (the key used in reports), ``expensive`` (run only on rows that survived the cheap ones)
and ``stateful`` (needs ``commit(image, row)`` when a row is finally kept, and ``reset()`` before a new pass;
the near-duplicate filter is the only one). ``align.datatools.filter_dataset`` runs a list of them over a
``datasets.Dataset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from qwen_image.errors import UserError

# The project's one rule for the text a caption asks to render (also used by the OCR reward and the evaluation).
from rewards.text import extract_quoted_text, target_text

__all__ = [
    "to_luma",
    "laplacian_variance",
    "rms_contrast",
    "mean_luma",
    "clipped_fraction",
    "perceptual_hash",
    "hamming_distance",
    "extract_quoted_text",
    "ImageFilter",
    "ResolutionFilter",
    "BlurFilter",
    "ContrastFilter",
    "ExposureFilter",
    "DuplicateFilter",
    "OCRAgreementFilter",
    "default_filters",
]


# --------------------------------------------------------------------------------------------------- metrics
def to_luma(image: Image.Image, max_side: int | None = None) -> np.ndarray:
    """Luma (ITU-R 601, PIL "L") as float64 in [0, 255]; optionally downscaled so the long side <= max_side."""
    img = image
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return np.asarray(img.convert("L"), dtype=np.float64)


def laplacian_variance(image: Image.Image, max_side: int | None = 1024) -> float:
    """Variance of the 4-neighbour Laplacian of the luma (the classic blur measure; low = blurry).

    Computed on the valid interior (no padding), in [0,255] luma units, so thresholds match OpenCV's
    ``cv2.Laplacian(gray, cv2.CV_64F).var()`` up to border handling. Images are downscaled to ``max_side``
    first (set None to disable) so the value does not depend much on the raw resolution of huge images.
    """
    y = to_luma(image, max_side)
    if y.shape[0] < 3 or y.shape[1] < 3:
        return 0.0
    lap = y[1:-1, :-2] + y[1:-1, 2:] + y[:-2, 1:-1] + y[2:, 1:-1] - 4.0 * y[1:-1, 1:-1]
    return float(lap.var())


def rms_contrast(image: Image.Image, normalize: bool = True) -> float:
    """RMS contrast = standard deviation of the luma; in [0, 0.5] when ``normalize`` (luma / 255)."""
    y = to_luma(image, 1024)
    s = float(y.std())
    return s / 255.0 if normalize else s


def mean_luma(image: Image.Image) -> float:
    """Mean luma in [0, 1]."""
    return float(to_luma(image, 1024).mean() / 255.0)


def clipped_fraction(image: Image.Image, low: int = 5, high: int = 250) -> tuple[float, float]:
    """(fraction of pixels with luma <= low, fraction with luma >= high)."""
    y = to_luma(image, 1024)
    return float((y <= low).mean()), float((y >= high).mean())


def perceptual_hash(image: Image.Image, method: str = "phash", hash_size: int = 8):
    """An ``imagehash.ImageHash`` (``phash``, ``dhash``, ``ahash``, ``whash``); ``a - b`` is the Hamming distance."""
    import imagehash

    fn = {"phash": imagehash.phash, "dhash": imagehash.dhash, "ahash": imagehash.average_hash,
          "average_hash": imagehash.average_hash, "whash": imagehash.whash}[method]
    return fn(image.convert("RGB"), hash_size=hash_size)


def hamming_distance(a, b) -> int:
    """Hamming distance between two ``imagehash.ImageHash`` objects (or equal-shape bool arrays)."""
    a = getattr(a, "hash", a)
    b = getattr(b, "hash", b)
    return int(np.count_nonzero(np.asarray(a).ravel() != np.asarray(b).ravel()))


# --------------------------------------------------------------------------------------------------- filters
class ImageFilter:
    """Base class. Subclasses implement ``__call__(image, row) -> reason | None``."""

    name: str = "filter"
    expensive: bool = False
    stateful: bool = False

    def __call__(self, image: Image.Image, row: dict | None = None) -> str | None:  # pragma: no cover
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def commit(self, image: Image.Image, row: dict | None = None) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


@dataclass(repr=False)
class ResolutionFilter(ImageFilter):
    """Drop images whose short side < ``min_side``, pixel count < ``min_pixels``, or long/short > ``max_aspect_ratio``.

    Defaults follow the report's first stage (256p curation). Edges are inclusive: exactly ``min_side`` is kept.
    """

    min_side: int | None = 256
    min_pixels: int | None = None
    max_aspect_ratio: float | None = 3.0
    name: str = "resolution"

    def __call__(self, image, row=None):
        w, h = image.size
        short, long_ = min(w, h), max(w, h)
        if self.min_side is not None and short < self.min_side:
            return f"short side {short} < {self.min_side}"
        if self.min_pixels is not None and w * h < self.min_pixels:
            return f"{w}x{h}={w * h} px < {self.min_pixels}"
        if self.max_aspect_ratio is not None and short > 0 and long_ / short > self.max_aspect_ratio:
            return f"aspect ratio {long_ / short:.2f} > {self.max_aspect_ratio}"
        if short == 0:
            return "empty image"
        return None


@dataclass(repr=False)
class BlurFilter(ImageFilter):
    """Drop images whose variance of the Laplacian (luma 0-255, long side <= ``max_side``) is below ``min_variance``.

    100 is the usual starting point for photos; flat design images can legitimately score low, so tune on a
    sample (``filter_dataset`` reports the measured value in every reason).
    """

    min_variance: float = 100.0
    max_side: int | None = 1024
    name: str = "blur"

    def __call__(self, image, row=None):
        v = laplacian_variance(image, self.max_side)
        if v < self.min_variance:
            return f"laplacian variance {v:.1f} < {self.min_variance}"
        return None


@dataclass(repr=False)
class ContrastFilter(ImageFilter):
    """Drop low-contrast images: luma standard deviation / 255 (RMS contrast) below ``min_contrast``."""

    min_contrast: float = 0.05
    name: str = "contrast"

    def __call__(self, image, row=None):
        c = rms_contrast(image)
        if c < self.min_contrast:
            return f"rms contrast {c:.4f} < {self.min_contrast}"
        return None


@dataclass(repr=False)
class ExposureFilter(ImageFilter):
    """Drop over/under-exposed images: mean luma outside [``min_mean``, ``max_mean``] or too many clipped pixels.

    ``max_clipped``: maximum fraction of pixels at luma >= 250 (blown highlights) or <= 5 (crushed shadows);
    None disables that check. White-background design images clip by nature: leave it None for them.
    """

    min_mean: float | None = 0.08
    max_mean: float | None = 0.92
    max_clipped: float | None = None
    name: str = "exposure"

    def __call__(self, image, row=None):
        m = mean_luma(image)
        if self.min_mean is not None and m < self.min_mean:
            return f"underexposed: mean luma {m:.3f} < {self.min_mean}"
        if self.max_mean is not None and m > self.max_mean:
            return f"overexposed: mean luma {m:.3f} > {self.max_mean}"
        if self.max_clipped is not None:
            dark, bright = clipped_fraction(image)
            if bright > self.max_clipped:
                return f"overexposed: {bright:.1%} pixels clipped white > {self.max_clipped:.1%}"
            if dark > self.max_clipped:
                return f"underexposed: {dark:.1%} pixels clipped black > {self.max_clipped:.1%}"
        return None


@dataclass(repr=False)
class DuplicateFilter(ImageFilter):
    """Near-duplicate removal with a perceptual hash: keep the first, drop later images within ``max_distance`` bits.

    Stateful: only images that are finally kept (``commit``) are remembered, so a duplicate whose first copy was
    dropped by another filter survives. ``max_distance=0`` removes exact-hash duplicates only. For the default
    64-bit pHash, 0-4 is "same image re-encoded/resized", ~10 starts to catch crops and edits.
    """

    max_distance: int = 4
    method: str = "phash"
    hash_size: int = 8
    name: str = "duplicate"
    stateful: bool = field(default=True, init=False)
    expensive: bool = field(default=True, init=False)  # run after the cheap filters so rejects are not remembered

    def __post_init__(self):
        self.reset()

    def reset(self):
        self._hashes: list[np.ndarray] = []
        self._ids: list[Any] = []
        self._matrix: np.ndarray | None = None
        self._pending: tuple[np.ndarray, Any] | None = None
        self._counter = 0

    def _hash(self, image) -> np.ndarray:
        return np.asarray(perceptual_hash(image, self.method, self.hash_size).hash, dtype=bool).ravel()

    def __call__(self, image, row=None):
        h = self._hash(image)
        self._pending = (h, self._counter)
        self._counter += 1
        if self._hashes:
            if self._matrix is None or len(self._matrix) != len(self._hashes):
                self._matrix = np.stack(self._hashes)
            d = np.count_nonzero(self._matrix != h, axis=1)
            j = int(d.argmin())
            if d[j] <= self.max_distance:
                return f"near-duplicate of kept image #{self._ids[j]} (hamming {int(d[j])} <= {self.max_distance})"
        return None

    def commit(self, image, row=None):
        if self._pending is None:
            self(image, row)
        h, idx = self._pending
        if row is not None and "__index__" in row:
            idx = row["__index__"]
        self._hashes.append(h)
        self._ids.append(idx)
        self._pending = None


@dataclass(repr=False)
class OCRAgreementFilter(ImageFilter):
    """Caption/OCR agreement for text images: drop rows whose OCR text disagrees with the caption's quoted text.

    The target is ``row[text_column]`` when given and present, else the quoted spans of ``row[prompt_column]``
    (:func:`rewards.text.extract_quoted_text`). Rows without a target are not text images and are kept.

    ``scorer``: a reward-style callable ``scorer(prompts, images, **columns) -> list[float | None]`` in [0, 1]
    (None = not applicable = keep). Default: ``rewards.get_reward("ocr")`` from this repository (imported
    lazily; it runs RapidOCR offline, ~0.2-0.6 s per image on CPU).
    """

    min_score: float = 0.8
    prompt_column: str = "prompt"
    text_column: str | None = "text"
    scorer: Callable[..., list] | None = None
    name: str = "ocr_agreement"
    expensive: bool = field(default=True, init=False)

    def _get_scorer(self):
        if self.scorer is None:
            try:
                import rewards
            except ImportError as e:  # pragma: no cover - depends on the sibling package
                raise ImportError("OCRAgreementFilter needs the `rewards` package of this repository "
                                  "(or pass scorer=...)") from e
            self.scorer = rewards.get_reward("ocr")
        return self.scorer

    def target(self, row: dict | None) -> str | None:
        row = row or {}
        if self.text_column and row.get(self.text_column):
            return str(row[self.text_column])
        return target_text(row.get(self.prompt_column) or "")

    def __call__(self, image, row=None):
        target = self.target(row)
        if target is None:
            return None
        prompt = (row or {}).get(self.prompt_column) or f'"{target}"'
        if not extract_quoted_text(prompt):  # the target came from the text column: make the prompt quote it
            prompt = f'{prompt} "{target}"'
        kwargs = {"text": [target]} if self.text_column else {}
        score = self._get_scorer()([prompt], [image], **kwargs)[0]
        if score is None:
            return None
        if score < self.min_score:
            return f"OCR agreement {score:.3f} < {self.min_score} for {target!r}"
        return None


def default_filters(text_images: bool = False, **overrides) -> list[ImageFilter]:
    """Resolution, blur, contrast, exposure, near-duplicates (+ OCR agreement when ``text_images``).

    ``overrides`` maps a filter name to a dict of its arguments, or to None to leave the filter out, e.g.
    ``default_filters(blur={"min_variance": 50}, exposure=None)``.
    """
    spec: list[tuple[str, type]] = [("resolution", ResolutionFilter), ("blur", BlurFilter),
                                    ("contrast", ContrastFilter), ("exposure", ExposureFilter)]
    if text_images:
        spec.append(("ocr_agreement", OCRAgreementFilter))
    spec.append(("duplicate", DuplicateFilter))
    unknown = set(overrides) - {n for n, _ in spec}
    if unknown:
        raise UserError(f"unknown filter names {sorted(unknown)}")
    out = []
    for name, cls in spec:
        if name in overrides and overrides[name] is None:
            continue
        out.append(cls(**(overrides.get(name) or {})))
    return out
