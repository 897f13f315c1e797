"""Preference pairs for Flow-DPO: rows ``prompt``, ``chosen``, ``rejected`` (images), optional ``votes``, ``agreement``.

Sources: a folder (or a ``.jsonl`` file) with ``metadata.jsonl`` whose ``chosen``/``rejected`` (or
``chosen_file_name``/``rejected_file_name``) are image paths relative to it; a dataset written with
``Dataset.save_to_disk`` (what the annotation bridge exports); or any local ``datasets`` folder/script.

Validation drops, and counts, rows that cannot train: a missing prompt, an unreadable image, identical chosen and
rejected images (pixel-equal: the pair carries no signal), ties and pairs whose votes favour ``rejected``, and pairs
below ``min_agreement``.

``votes`` may be ``[n_chosen, n_rejected]``, ``{"chosen": n, "rejected": m}`` or one label per rater
(``"chosen"``/``"rejected"``/anything else = no preference). ``agreement`` is the fraction of raters who agree with
the majority, in [0, 1]; when absent it is derived from ``votes``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from datasets import Dataset, Image

from qwen_image.errors import UserError

from .loading import read_jsonl_rows, write_synthetic_folder
from .report import RowReport
from .sources import load_source, read_local_dataset

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("chosen", "rejected")


def load_preference_dataset(
    dataset_name: str,
    split: str = "train",
    prompt_column: str = "prompt",
    min_agreement: float = 0.0,
) -> tuple[Dataset, RowReport]:
    """Load, validate and filter preference pairs. Returns the kept rows (``prompt``, ``chosen``, ``rejected`` as
    ``datasets.Image`` columns, plus any other columns) and a report of what was dropped."""
    if not 0.0 <= min_agreement <= 1.0:
        raise UserError(f"min_agreement must be in [0, 1], got {min_agreement}")
    ds = _load(dataset_name, split)
    if prompt_column != "prompt" and prompt_column in ds.column_names:
        ds = ds.rename_column(prompt_column, "prompt")
    missing = [c for c in ("prompt", *IMAGE_COLUMNS) if c not in ds.column_names]
    if missing:
        raise UserError(
            f"preference dataset {dataset_name!r} lacks column(s) {missing} (columns: {ds.column_names}); "
            "it needs prompt, chosen, rejected."
        )
    if min_agreement > 0 and "agreement" not in ds.column_names and "votes" not in ds.column_names:
        raise UserError(f"min_agreement={min_agreement} but the dataset has neither an 'agreement' nor a 'votes' column.")
    for column in IMAGE_COLUMNS:
        # Undecoded: validation opens each image itself, so one bad file is a counted skip, not a crash.
        ds = ds.cast_column(column, Image(decode=False))

    report = RowReport(what="preference pairs", total=len(ds))
    keep: list[int] = []
    for i, row in enumerate(ds):
        reason = _problem(row, min_agreement)
        if reason is None:
            keep.append(i)
            report.keep(i)
        else:
            report.drop(i, reason)
    logger.info("%s", report)
    if not keep:
        raise UserError(f"no usable preference pairs in {dataset_name!r}: {report.summary()}")
    ds = ds.select(keep) if len(keep) < len(ds) else ds
    for column in IMAGE_COLUMNS:
        ds = ds.cast_column(column, Image())
    return ds, report


def vote_counts(votes: Any) -> tuple[float, float] | None:
    """(votes for chosen, votes for rejected) from any supported ``votes`` format, or None when unknown."""
    if isinstance(votes, str):
        try:
            votes = json.loads(votes)
        except json.JSONDecodeError:
            return None
    if votes is None:
        return None
    if isinstance(votes, dict):
        if "chosen" in votes or "rejected" in votes:
            return float(votes.get("chosen") or 0), float(votes.get("rejected") or 0)
        return None
    if isinstance(votes, (list, tuple)):
        if votes and all(isinstance(v, str) for v in votes):
            labels = Counter(v.strip().lower() for v in votes)
            return float(labels["chosen"]), float(labels["rejected"])
        if len(votes) == 2 and all(isinstance(v, (int, float)) for v in votes):
            return float(votes[0]), float(votes[1])
    return None


def _problem(row: dict, min_agreement: float) -> str | None:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "missing prompt"
    digests = []
    for column in IMAGE_COLUMNS:
        value = row[column]
        if value is None or (value.get("bytes") is None and not value.get("path")):
            return f"no {column} image"
        if value.get("bytes") is None and not Path(value["path"]).is_file():
            return f"{column} image not found"
        digest = _pixel_digest(value)
        if digest is None:
            return f"unreadable {column} image"
        digests.append(digest)
    if digests[0] == digests[1]:
        return "identical images"
    counts = vote_counts(row.get("votes"))
    if counts is not None:
        if counts[0] == counts[1]:
            return "tie"
        if counts[1] > counts[0]:
            return "votes favour rejected"
    if min_agreement > 0:
        agreement = row.get("agreement")
        if agreement is None and counts is not None:
            agreement = max(counts) / sum(counts)
        if agreement is None:
            return "no agreement"
        try:
            agreement = float(agreement)
        except (TypeError, ValueError):
            return "agreement not a number"
        if not 0.0 <= agreement <= 1.0:  # also NaN: it compares False both ways and would pass any threshold
            return "agreement not in [0, 1]"
        if agreement < min_agreement:
            return f"agreement below {min_agreement:g}"
    return None


def _pixel_digest(value: dict | None) -> str | None:
    from PIL import Image as PILImage

    from ..datatools.filtering import load_image

    if value is None or (value.get("bytes") is None and not value.get("path")):
        return None
    try:
        img = load_image(value)  # 8-bit RGB, as the trainer will see it
    except (OSError, ValueError, PILImage.DecompressionBombError):
        return None
    return hashlib.sha1(f"{img.size}".encode() + img.tobytes()).hexdigest()


def _load(dataset_name: str | None, split: str) -> Dataset:
    if not dataset_name:
        raise UserError("no preference data: set dataset_name (a folder with metadata.jsonl, or a saved dataset).")

    def read_file(path: Path) -> Dataset:
        return _from_jsonl(path) if path.suffix == ".jsonl" else read_local_dataset(path, split)

    return load_source(dataset_name, split, metadata=_from_jsonl, file=read_file, what="preference dataset")


def _from_jsonl(meta: Path) -> Dataset:
    """imagefolder-style metadata.jsonl with two image paths per row (relative to its folder)."""
    root = meta.parent
    rows = read_jsonl_rows(meta, example='{"prompt": "...", "chosen": "a.png", "rejected": "b.png"}')
    present: set[str] = set()
    for rec in rows:
        present.update(c for c in IMAGE_COLUMNS if rec.get(c) is not None or rec.get(f"{c}_file_name") is not None)
        for column in IMAGE_COLUMNS:
            value = rec.pop(f"{column}_file_name", None) or rec.get(column)
            rec[column] = str(root / value) if isinstance(value, str) and value else None
    if not rows:
        raise UserError(f"{meta} has no rows.")
    absent = [c for c in IMAGE_COLUMNS if c not in present]
    if absent:
        raise UserError(f"{meta}: no row has a {absent[0]!r} image (or {absent[0]}_file_name); each pair needs "
                        f"prompt, chosen and rejected.")
    # Image(decode=False) columns accept dicts {"path", "bytes"}; missing files surface later as counted skips.
    columns = sorted({k for r in rows for k in r})
    data = {c: [r.get(c) for r in rows] for c in columns}
    for column in IMAGE_COLUMNS:
        data[column] = [{"path": p, "bytes": None} if p else None for p in data[column]]
    if "votes" in data:
        # Mixed formats (lists/dicts) do not fit one Arrow type: keep them as JSON text, parsed back in validation.
        data["votes"] = [json.dumps(v) if v is not None else None for v in data["votes"]]
    ds = Dataset.from_dict(data)
    for column in IMAGE_COLUMNS:
        ds = ds.cast_column(column, Image(decode=False))
    return ds


def write_synthetic_pairs(folder: str | Path, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Demo/test pairs where the chosen image is consistently brighter than the rejected one (same texture).

    Writes ``c{i}.png``, ``r{i}.png`` and ``metadata.jsonl``; a DPO run on it must reach high implicit accuracy.
    """
    import numpy as np

    rng = np.random.default_rng(seed)

    def items():
        for i in range(n):
            texture = rng.integers(0, 60, (size, size, 3)) + rng.integers(0, 40, 3)
            yield ({"prompt": f"a photo number {i % 7}", "chosen": f"c{i}.png", "rejected": f"r{i}.png",
                    "votes": [3, 0], "agreement": 1.0}, {f"c{i}.png": texture + 170, f"r{i}.png": texture + 10})

    return write_synthetic_folder(folder, items())
