"""Load image datasets (an imagefolder with ``metadata.jsonl``, a ``save_to_disk`` folder, any local ``datasets``
dataset) and check their rows: images that are missing or unreadable, empty prompts. General over image columns
so SFT (``image``) and preference data (``chosen``, ``rejected``) share it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from qwen_image.errors import UserError
from qwen_image.jsonl import read_jsonl_objects

from .ratings import describe_row, raise_bad_rows
from .report import RowReport
from .sources import load_source

# Kept but warned about (and counted in the data summary): images this small or this elongated are rarely meant.
MIN_IMAGE_SIDE = 16
MAX_ASPECT_RATIO = 8.0


def _is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _ratings_column(values: list) -> list:
    """Arrow needs one type per column: when any row's ratings hold a non-number (``"five"``), the whole column is
    kept as JSON text so the rating filter can name the row and the value (instead of a NaN)."""
    if all(v is None or (isinstance(v, list) and all(_is_number(x) for x in v)) or
           (_is_number(v)) for v in values):
        return values
    return [None if v is None else json.dumps(v) for v in values]


def read_jsonl_rows(path: Path, example: str = "") -> list[dict]:
    """The JSON objects of a .jsonl file, blank lines skipped; a bad line is a UserError naming file and line
    (``example`` shows what a row should look like). The one JSONL reader of the data layer."""
    return read_jsonl_objects(path, f" like {example}" if example else "")


def write_synthetic_folder(folder: str | Path, items: Iterable[tuple[dict, dict[str, np.ndarray]]]) -> Path:
    """Write demo/test data: for each ``(row, {file name: pixels})`` the images (pixels clipped to [0, 255], saved as
    8-bit RGB) and the row as a line of ``metadata.jsonl``; ``folder`` is created. Returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for row, images in items:
        for name, pixels in images.items():
            Image.fromarray(np.asarray(pixels).clip(0, 255).astype(np.uint8)).save(folder / name)
        lines.append(json.dumps(row) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines), encoding="utf-8")
    return folder


def read_imagefolder(meta: Path, image_column: str = "image") -> Dataset:
    """An imagefolder read from its ``metadata.jsonl``: ``image`` holds the absolute path (checked and cast to an
    Image feature by :func:`validate_rows`), ``file_name`` is kept so messages can name the row. The dataset's
    fingerprint covers the metadata and each image file's size and mtime, so edited images re-encode."""
    rows = read_jsonl_rows(meta)
    keys = dict.fromkeys(k for r in rows for k in r)
    if not rows:
        raise UserError(f"{meta} has no rows")
    if image_column in keys:
        raise UserError(f"{meta}: rows must not have an {image_column!r} key (the image comes from file_name)")
    base = meta.parent
    columns: dict[str, list] = {k: [r.get(k) for r in rows] for k in keys}
    columns.setdefault("file_name", [None] * len(rows))
    if "ratings" in columns:
        columns["ratings"] = _ratings_column(columns["ratings"])

    paths, signature = [], []
    for name in columns["file_name"]:
        path = (base / str(name)).resolve() if name else None
        paths.append(str(path) if path else None)
        try:
            st = os.stat(path) if path else None
            signature.append(f"{st.st_size}-{st.st_mtime_ns}" if st else "missing")
        except OSError:
            signature.append("missing")
    columns[image_column] = paths
    columns["_image_signature"] = signature
    try:
        ds = Dataset.from_dict(columns)
    except Exception as err:  # pyarrow type clash: name the row and column instead of a pyarrow traceback
        raise UserError(f"{meta}: {mixed_types(rows) or f'a column has values of mixed types ({err})'}") from None
    # Dropping the signature keeps it in the fingerprint (a transform's fingerprint hashes its input's).
    return ds.remove_columns("_image_signature")


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "a mapping" if isinstance(value, dict) else type(value).__name__


def mixed_types(rows: list[dict]) -> str | None:
    """The first row whose value of some key is of another kind than that key's first value (what pyarrow refuses
    as a column), said as ``row 3 (file_name='a.png'): 'prompt' is 5 (a number) where row 0 has text``."""
    from .ratings import describe_row

    first: dict[str, tuple[int, str]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            if key not in first:
                first[key] = (i, kind)
            elif first[key][1] != kind and {kind, first[key][1]} != {"a number"}:
                return (f"{describe_row(i, row)}: {key!r} is {value!r} ({kind}) where row {first[key][0]} has "
                        f"{first[key][1]}: every row's {key!r} must be of one kind")
    return None


def load_image_dataset(name: str, split: str = "train", image_column: str = "image") -> Dataset:
    """An imagefolder with ``metadata.jsonl``, a ``save_to_disk`` folder, a data file, any local ``datasets``
    folder/script, or a Hub dataset in the local cache (resolved by :func:`align.data.sources.load_source`)."""
    return load_source(name, split, metadata=lambda meta: read_imagefolder(meta, image_column), hub=True)


def _image_source(value) -> tuple[str | None, bytes | None]:
    if isinstance(value, dict):
        return value.get("path"), value.get("bytes")
    if isinstance(value, (str, os.PathLike)):
        return str(value), None
    return None, None


def image_problem(value) -> str | None:
    """Why an image cell cannot be used (None when it opens): missing file, unreadable data, no image at all."""
    return _inspect_image(value)[0]


def _inspect_image(value) -> tuple[str | None, tuple[int, int] | None]:
    """(problem or None, (width, height) when it opens)."""
    if isinstance(value, Image.Image):
        return None, value.size
    path, data = _image_source(value)
    if data is None and not path:
        return "no image", None
    if data is None and not os.path.isfile(path):
        return f"image not found: {path}", None
    try:
        import io

        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            size = img.size
            img.verify()  # header + structure, without decoding all pixels twice (encoding decodes them anyway)
    except Exception as err:
        return f"unreadable image {path or '<bytes>'}: {type(err).__name__}", None
    return None, size


def _size_warning(size: tuple[int, int]) -> str | None:
    width, height = size
    if min(width, height) < MIN_IMAGE_SIDE:
        return "tiny_image"
    if max(width, height) / max(1, min(width, height)) > MAX_ASPECT_RATIO:
        return "extreme_aspect_ratio"
    return None


def validate_rows(
    dataset: Dataset,
    image_columns: Sequence[str] = ("image",),
    prompt_column: str = "prompt",
    skip_bad_rows: bool = False,
    extra_check: Callable[[dict], str | None] | None = None,
) -> tuple[Dataset, RowReport]:
    """Check every row: each image column opens, the prompt is a non-empty string, ``extra_check(row)`` (if given)
    returns None. Bad rows raise one ValueError naming them, or with ``skip_bad_rows`` are dropped and counted.
    Image columns come back as decoded ``Image`` features."""
    missing = [c for c in (*image_columns, prompt_column) if c not in dataset.column_names]
    if missing:
        raise UserError(f"the dataset has no column(s) {missing} (columns: {dataset.column_names})")
    # Read cells without decoding: paths/bytes only.
    view = dataset
    for column in image_columns:
        if isinstance(view.features[column], ImageFeature):
            view = view.cast_column(column, ImageFeature(decode=False))
    summary = RowReport(total=len(dataset), settings="rows checked")
    keep, bad = [], []
    seen_files: set = set()
    for i, row in enumerate(view):
        problem = None
        prompt = row[prompt_column]
        name = row.get("file_name")
        if name:
            if name in seen_files:
                summary.warn("duplicate_file_name", describe_row(i, row))
            seen_files.add(name)
        if not isinstance(prompt, str) or not prompt.strip():
            problem = ("empty prompt", f"empty prompt {prompt!r}")
        for column in image_columns:
            if problem:
                break
            why, size = _inspect_image(row[column])
            if why:
                reason = "missing_image" if why.startswith(("image not found", "no image")) else "unreadable_image"
                problem = (reason, f"{column}: {why}")
            elif size is not None and (warning := _size_warning(size)):
                summary.warn(warning, f"{describe_row(i, row)} {size[0]}x{size[1]}")
        if problem is None and extra_check is not None:
            why = extra_check(row)
            problem = ("bad_row", why) if why else None
        if problem:
            label = describe_row(i, row)
            summary.drop(i, f"{problem[0].replace(' ', '_')}: {problem[1]}", label)
            bad.append(f"{label}: {problem[1]}")
        else:
            keep.append(i)
            summary.keep(i)
    if bad and not skip_bad_rows:
        raise_bad_rows(bad)
    out = dataset if len(keep) == len(dataset) else dataset.select(keep)
    for column in image_columns:
        if not isinstance(out.features[column], ImageFeature) or not out.features[column].decode:
            out = out.cast_column(column, ImageFeature())
    return out, summary
