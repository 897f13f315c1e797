"""OCR text-rendering reward (rapidocr 3.x, PP-OCR Chinese+English weights shipped in the wheel; offline).

* :func:`ocr_reward` / ``get_reward("ocr")`` - accuracy of the rendered text, in [0, 1].
* :func:`recognize_text` - the raw recognised text of an image in reading order (for data tools that
  check caption / OCR agreement); :func:`ocr_boxes` - the boxes themselves.
* :func:`get_ocr_engine` - the lazily created, per-process cached ``RapidOCR`` engine.
"""

from __future__ import annotations

import logging
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .images import to_pil
from .registry import register_reward
from .text import target_text, text_accuracy

__all__ = [
    "OcrBox",
    "get_ocr_engine",
    "ocr_boxes",
    "sort_reading_order",
    "recognize_text",
    "ocr_reward",
    "OcrReward",
]

log = logging.getLogger(__name__)

_ENGINES: dict[tuple, Any] = {}
_ENGINE_LOCK = threading.Lock()
_CALL_LOCKS: dict[tuple, threading.Lock] = {}


@dataclass(frozen=True)
class OcrBox:
    """One recognised text box: ``box`` is 4x2 corner points (x, y) in image pixels."""

    text: str
    score: float
    box: tuple[tuple[float, float], ...]

    @property
    def x_min(self) -> float:
        return min(p[0] for p in self.box)

    @property
    def y_center(self) -> float:
        ys = [p[1] for p in self.box]
        return (min(ys) + max(ys)) / 2

    @property
    def height(self) -> float:
        ys = [p[1] for p in self.box]
        return max(ys) - min(ys)


def get_ocr_engine(*, use_cuda: bool = False, text_score: float = 0.5, use_cls: bool = True,
                   num_threads: int = -1, det_side_len: int = 736):
    """The process-wide ``rapidocr.RapidOCR`` engine for these options (created on first use, then cached).

    Only the default (bundled) PP-OCRv6 small det/rec models are used, so nothing is ever downloaded.
    ``use_cuda=True`` needs ``onnxruntime-gpu``. ``num_threads=-1`` lets onnxruntime choose.
    ``det_side_len``: the detector resizes every image so that its shorter side is this many pixels
    (rapidocr's default 736). A 64 px image is thus upscaled 11x and detection costs as much as on a 736 px
    one; 256 reads small renders the same at about a seventh of the time (the CPU demo uses it).
    """
    key = (bool(use_cuda), float(text_score), bool(use_cls), int(num_threads), int(det_side_len))
    eng = _ENGINES.get(key)
    if eng is not None:
        return eng
    with _ENGINE_LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            try:
                from rapidocr import RapidOCR
            except ImportError as e:  # pragma: no cover - pinned dependency
                raise RuntimeError("the ocr reward needs rapidocr: pip install rapidocr==3.10.0 onnxruntime") from e
            params = {
                "Global.log_level": "error",  # blank images would log a warning per call
                "Global.text_score": float(text_score),
                "Global.use_cls": bool(use_cls),
                "EngineConfig.onnxruntime.use_cuda": bool(use_cuda),
                "EngineConfig.onnxruntime.intra_op_num_threads": int(num_threads),
                "Det.limit_side_len": int(det_side_len),
            }
            eng = RapidOCR(params=params)
            _ENGINES[key] = eng
            _CALL_LOCKS[key] = threading.Lock()
    return eng


def _engine_and_lock(**engine_kwargs):
    eng = get_ocr_engine(**engine_kwargs)
    key = next(k for k, v in _ENGINES.items() if v is eng)
    return eng, _CALL_LOCKS[key]


def ocr_boxes(image: Any, **engine_kwargs) -> list[OcrBox]:
    """Recognised boxes of one image, in the detector's order (use :func:`sort_reading_order`)."""
    eng, lock = _engine_and_lock(**engine_kwargs)
    arr = np.asarray(to_pil(image))[:, :, ::-1].copy()  # RGB -> BGR, as rapidocr expects for arrays
    with lock:  # RapidOCR mutates its own state per call
        out = eng(arr)
    if out is None or getattr(out, "txts", None) is None or getattr(out, "boxes", None) is None:
        return []
    boxes = []
    for txt, score, box in zip(out.txts, out.scores, out.boxes):
        pts = tuple((float(x), float(y)) for x, y in np.asarray(box).reshape(-1, 2))
        boxes.append(OcrBox(str(txt), float(score), pts))
    return boxes


def sort_reading_order(boxes: Sequence[OcrBox], line_tol: float = 0.5) -> list[list[OcrBox]]:
    """Group boxes into lines, top to bottom, each sorted left to right.

    A box joins the current line when its y-centre is within ``line_tol`` x the median box height of the
    line's mean y-centre (boxes are visited by y-centre). This fixes the detector order, which sorts by top
    edge, so a taller box to the right can come before a shorter one to its left.
    """
    if not boxes:
        return []
    med_h = statistics.median(max(b.height, 1.0) for b in boxes)
    tol = line_tol * med_h
    lines: list[list[OcrBox]] = []
    centers: list[float] = []
    for b in sorted(boxes, key=lambda b: b.y_center):
        if lines and abs(b.y_center - centers[-1]) < tol:
            lines[-1].append(b)
            centers[-1] = sum(x.y_center for x in lines[-1]) / len(lines[-1])
        else:
            lines.append([b])
            centers.append(b.y_center)
    return [sorted(line, key=lambda b: b.x_min) for line in lines]


def recognize_text(image: Any, *, line_sep: str = "\n", box_sep: str = " ", **engine_kwargs) -> str:
    """The text recognised in ``image``, in reading order: boxes joined by ``box_sep`` within a line and
    lines by ``line_sep``. ``""`` when nothing is found."""
    lines = sort_reading_order(ocr_boxes(image, **engine_kwargs))
    return line_sep.join(box_sep.join(b.text for b in line) for line in lines)


def _targets(prompts: Sequence[str], text: Sequence[str | None] | None) -> list[str | None]:
    if text is not None and len(text) != len(prompts):
        raise ValueError(f"'text' column has {len(text)} entries for {len(prompts)} prompts")
    out = []
    for i, p in enumerate(prompts):
        t = text[i] if text is not None else None
        if t is None or not str(t).strip():
            t = target_text(p or "")
        out.append(t)
    return out


@register_reward("ocr")
class OcrReward:
    """Text-rendering accuracy: ``1 - min(lev(ocr, target), len(target)) / len(target)``.

    Range [0, 1] (1 = the target text is read exactly); None when a sample has no target. The target is the
    ``text`` column when given (non-empty), else the quoted text of the prompt (``"..."``, ``“...”``,
    ``「...」``, ``'...'``, ... see :func:`rewards.text.extract_quoted_text`). Both strings are NFKC-normalised,
    case-folded and stripped of all whitespace; recognised boxes are joined in reading order. Chinese and
    English. A failure on one image gives 0.0 for it (logged), as in flow_grpo.

    Options: ``substring_match`` (target contained in the OCR text scores 1.0, forgiving extra scene text),
    ``text_score`` (min box confidence, default 0.5), ``use_cls``, ``use_cuda``, ``num_threads``,
    ``det_side_len`` (detector input size, see :func:`get_ocr_engine`; lower it for small images).
    """

    def __init__(self, *, substring_match: bool = False, text_score: float = 0.5, use_cls: bool = True,
                 use_cuda: bool = False, num_threads: int = -1, det_side_len: int = 736):
        if int(det_side_len) < 32:
            raise ValueError(f"det_side_len={det_side_len}: the detector needs at least 32 px")
        self.substring_match = substring_match
        self.engine_kwargs = dict(text_score=text_score, use_cls=use_cls, use_cuda=use_cuda,
                                  num_threads=num_threads, det_side_len=int(det_side_len))

    def __call__(self, prompts: list[str], images: list[Image.Image], text: Sequence[str | None] | None = None,
                 **columns: Any) -> list[float | None]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        out: list[float | None] = []
        for tgt, img in zip(_targets(prompts, text), images):
            if tgt is None:
                out.append(None)
                continue
            try:
                rec = recognize_text(img, **self.engine_kwargs)
            except Exception as e:  # noqa: BLE001 - one bad image must not kill a training step
                log.warning("ocr reward: OCR failed (%s: %s); scoring 0", type(e).__name__, e)
                rec = ""
            out.append(text_accuracy(rec, tgt, substring_match=self.substring_match))
        return out


_DEFAULT_OCR: OcrReward | None = None


def ocr_reward(prompts: list[str], images: list[Image.Image], **columns: Any) -> list[float | None]:
    """Functional form of :class:`OcrReward` with default options. Range [0, 1]; None without a target."""
    global _DEFAULT_OCR
    if _DEFAULT_OCR is None:
        _DEFAULT_OCR = OcrReward()
    return _DEFAULT_OCR(prompts, images, **columns)
