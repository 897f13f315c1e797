"""Run image filters over a ``datasets.Dataset`` (or a list of rows) and report what was dropped and why."""

from __future__ import annotations

import io
import sys
from typing import Any, Iterable, Sequence

from PIL import Image

from qwen_image.images import to_rgb

from ..data.report import RowReport
from .image_filters import ImageFilter

__all__ = ["RowReport", "filter_dataset", "filter_images", "load_image"]


def open_image(value: Any) -> Image.Image:
    """A PIL image, as stored, from a PIL image, a path, bytes, or a ``datasets`` Image dict ({"bytes", "path"})."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
        raise ValueError("image dict has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    raise TypeError(f"cannot read an image from {type(value).__name__}")


def load_image(value: Any) -> Image.Image:
    """:func:`open_image` as 8-bit RGB (``qwen_image.images.to_rgb``: 16-bit scaled, alpha on white, EXIF upright), so
    filters judge the image the trainers will see (a 16-bit PNG is not "overexposed")."""
    return to_rgb(open_image(value))


def _run_filters(image: Image.Image, row: dict, filters: Sequence[ImageFilter]) -> list[str]:
    reasons: list[str] = []
    # cheap, stateless filters all run, so the report says every reason a row fails
    for f in filters:
        if not f.expensive and not f.stateful:
            r = f(image, row)
            if r:
                reasons.append(f"{f.name}: {r}")
    # expensive / stateful ones only on survivors, in the order given
    if not reasons:
        for f in filters:
            if f.expensive or f.stateful:
                r = f(image, row)
                if r:
                    reasons.append(f"{f.name}: {r}")
                    break
    if not reasons:
        for f in filters:
            if f.stateful:
                f.commit(image, row)
    return reasons


def filter_images(images: Iterable[Image.Image], filters: Sequence[ImageFilter],
                  rows: Iterable[dict] | None = None) -> list[list[str]]:
    """Reasons per image (empty list = keep). ``rows`` gives the per-image metadata (e.g. the prompt)."""
    for f in filters:
        f.reset()
    rows_it = iter(rows) if rows is not None else None
    out = []
    for i, img in enumerate(images):
        row = dict(next(rows_it)) if rows_it is not None else {}
        row["__index__"] = i
        out.append(_run_filters(load_image(img), row, filters))
    return out


def filter_dataset(ds, filters: Sequence[ImageFilter], image_column: str = "image",
                   reason_column: str | None = None, verbose: bool = True, progress: bool = False):
    """Filter a dataset with image filters; returns ``(kept_ds, report)``.

    ``ds``: a ``datasets.Dataset`` or a list of dict rows. Every filter sees the decoded image and the row (so
    the OCR-agreement filter can read ``prompt``/``text``). Rows are visited in order; the near-duplicate filter
    keeps the first copy that passes all other filters.

    ``reason_column``: when set, that column (list of strings, empty = kept) is added to the returned rows,
    which is useful with ``ds.add_column`` style pipelines; the kept rows then carry an empty list. The full
    reasons of each dropped row are always in ``report.reasons`` (an :class:`align.data.report.RowReport`).
    ``verbose`` prints the report to stderr.
    """
    for f in filters:
        f.reset()
    names = []
    for f in filters:
        if f.name in names:
            raise ValueError(f"two filters named {f.name!r}: give one a different name")
        names.append(f.name)
    report = RowReport(what="filter_dataset", total=len(ds))
    all_reasons: list[list[str]] = []  # per row, kept rows too (the reason_column)
    is_hf = hasattr(ds, "select") and hasattr(ds, "column_names")
    other_cols = [c for c in (ds.column_names if is_hf else []) if c != image_column]
    meta = ds.select_columns(other_cols) if is_hf and other_cols else None
    img_ds = ds.select_columns([image_column]) if is_hf else None  # decoded one row at a time
    if is_hf and getattr(img_ds.features[image_column], "decode", False):
        # Undecoded cells: a corrupt file becomes a dropped row ("unreadable"), not a crash in datasets' decoder.
        from datasets import Image as ImageFeature

        img_ds = img_ds.cast_column(image_column, ImageFeature(decode=False))
    n = len(ds)
    iterator = range(n)
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="filtering", total=n)
        except ImportError:  # pragma: no cover
            pass
    for i in iterator:
        if is_hf:
            row = dict(meta[i]) if meta is not None else {}
            value = img_ds[i][image_column]
        else:
            full = ds[i]
            row = {k: v for k, v in full.items() if k != image_column}
            value = full[image_column]
        row["__index__"] = i
        try:
            image = load_image(value)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            image, reasons = None, [f"unreadable: {type(err).__name__}"]
        if image is not None:
            reasons = _run_filters(image, row, filters)
        all_reasons.append(reasons)
        if reasons:
            report.drop(i, reasons)
        else:
            report.keep(i)
    if is_hf:
        out = ds
        if reason_column:
            if reason_column in out.column_names:
                out = out.remove_columns(reason_column)
            out = out.add_column(reason_column, all_reasons)
        kept = out.select(report.kept_indices)
    else:
        kept = []
        for i in report.kept_indices:
            row = dict(ds[i])
            if reason_column:
                row[reason_column] = []
            kept.append(row)
    if verbose:
        print(report, file=sys.stderr)
    return kept, report
