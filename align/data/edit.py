"""Edit data (Qwen-Image-Edit-2509 / 2511, Qwen-Image-2.1 edit jobs): rows of an instruction, a target image and 1-3 control (reference)
images, checked, cached and batched for the edit trainers.

Row formats (the forms musubi-tuner, ai-toolkit and DiffSynth users already have, mapped to ``datasets`` columns):

* imagefolder ``metadata.jsonl``: ``{"file_name": "target.png", "prompt": "...", "control_image": "src.png"}``,
  more references in ``control_image_1`` / ``control_image_2``, or one list ``"control_images": ["a.png", "b.png"]``;
  paths are relative to the metadata file. ``ratings`` as in T2I SFT.
* any ``datasets`` dataset with the same columns (Image features, or a list of images in ``control_images``).

Everything the trainer needs is cached once per (data, model, sizes), as the bundle's ``conditioning`` builds it for
its family: the edit-template text embeddings (which read the control images, so the cache key holds them), the
target's VAE latents, the references' packed VAE latents with their grids, and for Qwen-Image-2.1 the image-slot
mask of the embeddings (:data:`IMG_MASK`). Batches never mix target sizes nor reference sizes (bucket key = both).
"""

from __future__ import annotations

import io
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from datasets import Dataset, List
from datasets import Image as ImageFeature
from PIL import Image

from qwen_image import QwenImage, References
from qwen_image.edit import MAX_REFERENCES
from qwen_image.errors import UserError
from qwen_image.images import to_rgb

from .encoding import center_crop_resize, collate_encoded, encoding_fingerprint, naming_rows
from .loading import image_problem, load_image_dataset
from .sources import metadata_path

CONTROL_COLUMNS = ("control_image", "control_image_1", "control_image_2")
CONTROL_LIST_COLUMN = "control_images"
# Column names that look like control images (control_image, control_image_3, control_images, controls...).
CONTROL_LIKE = re.compile(r"^control_?images?(_\d+)?$|^controls?$")
# The one column every loader below produces: a list of {"path", "bytes"} cells, in reference order.
CONTROLS = "control_images"
REFERENCE_LATENTS = "reference_latents"  # (L_1 + ... + L_n, 64): the references' packed latents, concatenated
REFERENCE_SHAPES = "reference_shapes"  # (n, 3): (1, h/16, w/16) per reference
IMG_MASK = "img_mask"  # (L,) 0/1, Qwen-Image-2.1 only: the text encoder's image slots among the prompt embeddings


def _undecoded(feature):
    if isinstance(feature, ImageFeature):
        return ImageFeature(decode=False)
    if isinstance(feature, List):
        return List(_undecoded(feature.feature))
    return feature


def _cell(value, base: Path | None) -> dict:
    """A control-image cell as {"path", "bytes"}; relative paths resolve against the imagefolder."""
    if value is None or value == "":
        return {"path": None, "bytes": None}
    if isinstance(value, dict):
        return {"path": value.get("path"), "bytes": value.get("bytes")}
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return {"path": None, "bytes": buf.getvalue()}
    path = Path(str(value)).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return {"path": str(path), "bytes": None}


def _signature(cell: dict) -> str:
    if cell["bytes"] is not None or not cell["path"]:
        return "inline"
    try:
        st = os.stat(cell["path"])
        return f"{st.st_size}-{st.st_mtime_ns}"
    except OSError:
        return "missing"


def with_control_list(
    dataset: Dataset,
    base: Path | None = None,
    control_columns: Sequence[str] = CONTROL_COLUMNS,
    list_column: str = CONTROL_LIST_COLUMN,
) -> Dataset:
    """Gather the numbered control columns (or the list column) into :data:`CONTROLS`, undecoded, in order.
    A missing numbered cell inside the list stays as an empty cell so :func:`control_problem` can name it."""
    numbered = [c for c in control_columns if c in dataset.column_names and c != list_column]
    has_list = list_column in dataset.column_names
    extra = [c for c in dataset.column_names if CONTROL_LIKE.match(c) and c not in (*control_columns, list_column)]
    if extra:  # a fourth reference would be silently dropped
        raise UserError(f"column {extra[0]!r}: the control images are {', '.join(control_columns)} (or one list "
                        f"{list_column!r}); Edit-2509/2511 take 1 to {MAX_REFERENCES}: drop or rename that column")
    if not numbered and not has_list:
        raise UserError(f"the dataset has no control image column: expected {list(control_columns)} or a list "
                         f"column {list_column!r} (columns: {dataset.column_names})")
    if numbered and has_list:
        raise UserError(f"the dataset has both {numbered} and {list_column!r}: keep one way of listing control images")
    columns = [list_column] if has_list else numbered
    view = dataset.select_columns(columns)
    view = view.cast(view.features.__class__({c: _undecoded(view.features[c]) for c in columns}))
    cells, signature = [], []
    for row in view:
        if has_list:
            values = row[list_column] or []
            if not isinstance(values, (list, tuple)):
                values = [values]
        else:
            # Position k is control_columns[k] even when an earlier column is absent (a gap, reported later).
            values = [row.get(c) for c in control_columns[: control_columns.index(numbered[-1]) + 1]]
            while values and values[-1] in (None, ""):
                values.pop()
        row_cells = [_cell(v, base) for v in values]
        cells.append(row_cells)
        signature.append("|".join(_signature(c) for c in row_cells))
    out = dataset.remove_columns([c for c in columns if c in dataset.column_names])
    out = out.add_column(CONTROLS, cells).add_column("_control_signature", signature)
    # Dropping the signature keeps it in the fingerprint: edited control files re-encode.
    return out.remove_columns("_control_signature")


def load_edit_dataset(
    name: str,
    split: str = "train",
    image_column: str = "image",
    control_columns: Sequence[str] = CONTROL_COLUMNS,
    list_column: str = CONTROL_LIST_COLUMN,
) -> Dataset:
    """An edit dataset (imagefolder or ``datasets``) with its control images gathered into :data:`CONTROLS`."""
    dataset = load_image_dataset(name, split, image_column)
    path = Path(name).expanduser()
    meta = metadata_path(path, split) if path.is_dir() else None
    return with_control_list(dataset, meta.parent if meta else None, control_columns, list_column)


def check_no_control_columns(columns: Sequence[str], dataset_name: str, option: str = "--dataset_name") -> None:
    """A text-to-image run on edit data would train on the targets and silently ignore the control images."""
    controls = [c for c in columns if CONTROL_LIKE.match(c)]
    if controls:
        raise UserError(f"{option} {dataset_name}: edit data (column {controls[0]!r}) for a text-to-image model, which "
                        f"would ignore the control images: use an edit checkpoint (--model_name_or_path an "
                        f"Edit-2509/2511 folder, or --tiny_variant edit-2509), or a dataset without control images")


def control_problem(row: dict, expected: int = 0) -> str | None:
    """Why a row's control images cannot be used: none, more than 3, a gap in the numbering, a count other than
    ``expected`` (when > 0), a missing or unreadable file."""
    cells = row[CONTROLS] or []
    if not cells:
        return "no control image"
    if len(cells) > MAX_REFERENCES:
        return f"{len(cells)} control images; Edit-2509/2511 take 1 to {MAX_REFERENCES}"
    if expected and len(cells) != expected:
        return f"{len(cells)} control image(s), expected {expected} (num_control_images)"
    for k, cell in enumerate(cells):
        if cell["path"] is None and cell["bytes"] is None:
            return f"control image {k + 1} of {len(cells)} is empty (a gap in the numbered control columns)"
        why = image_problem(cell)
        if why:
            return f"control image {k + 1}: {why}"
    return None


def open_control(cell: dict) -> Image.Image:
    with Image.open(io.BytesIO(cell["bytes"]) if cell["bytes"] is not None else cell["path"]) as img:
        return to_rgb(img)  # 16-bit, alpha, palette, CMYK and EXIF handled as for the targets


def encode_edit_dataset(
    dataset: Dataset,
    model: QwenImage,
    model_id: str,
    cache_dir: str,
    image_columns: Sequence[str] = ("image",),
    prompt_column: str = "prompt",
    resolution: int = 1024,
    size_fn: Callable[[Image.Image], tuple[int, int]] | None = None,
    control_resolution: int = 0,
    batch_size: int = 4,
) -> Dataset:
    """Add ``prompt_embeds`` (edit template, reading the control images), ``<C>_latents`` per target column C
    (packed; SFT: ``image``, DPO: ``chosen`` and ``rejected``, all at the first column's size), ``height``/``width``,
    :data:`REFERENCE_LATENTS` and :data:`REFERENCE_SHAPES`. Controls keep their aspect ratio at
    ``control_resolution``² px (0: the model's reference area, what inference uses), sides multiples of 32."""
    reference_area = control_resolution**2 if control_resolution else model.edit_reference_area
    fingerprint = encoding_fingerprint(
        dataset, model_id, kind="edit", images=list(image_columns), prompt=prompt_column, res=resolution,
        size=getattr(size_fn, "__qualname__", None), size_repr=repr(size_fn), reference_area=reference_area,
        condition_area=model.edit_condition_area,
    )
    os.makedirs(cache_dir, exist_ok=True)

    @torch.no_grad()
    def encode_batch(batch: dict, indices: list[int]) -> dict:
        out: dict = defaultdict(list)
        sizes = [size_fn(img) if size_fn else (resolution, resolution) for img in batch[image_columns[0]]]
        for i, prompt in enumerate(batch[prompt_column]):
            # The image processor refuses some control images (e.g. elongated past its aspect-ratio limit) with a
            # ValueError: the row's data, not a bug.
            with naming_rows(batch, indices, row=i, convert=(ValueError, OSError)):
                controls = [open_control(c) for c in batch[CONTROLS][i]]
                # The bundle's own edit conditioning (the family's template, sizes and VAE), one row at a time so a
                # row's embedding never depends on its neighbours.
                cond = model.conditioning([prompt], [controls], reference_area=reference_area)
            # stored flat like the T2I cache (align.data.encoding): collate_encoded restores (L, D) from the length
            out["prompt_embeds"].append(cond.embeds[0].float().cpu().numpy().ravel())
            out["prompt_length"].append(int(cond.embeds.shape[1]))
            if cond.img_mask is not None:  # Qwen-Image-2.1: where the control images sit among the embeddings
                out[IMG_MASK].append(cond.img_mask[0].cpu().numpy().astype(np.int8))
            out[REFERENCE_LATENTS].append(cond.references.latents[0].float().cpu().numpy())
            out[REFERENCE_SHAPES].append([list(s) for s in cond.references.shapes])
            h, w = sizes[i]
            for column in image_columns:
                target = center_crop_resize(batch[column][i], h, w)
                out[f"{column}_latents"].append(model.pack(model.encode_images([target], h, w)).float().cpu().numpy()[0].ravel())
            out["height"].append(h)
            out["width"].append(w)
        return dict(out)

    encoded = dataset.map(
        encode_batch, with_indices=True, batched=True, batch_size=batch_size, remove_columns=[*image_columns, CONTROLS],
        new_fingerprint=fingerprint, cache_file_name=os.path.join(cache_dir, f"encoded-edit-{fingerprint}.arrow"),
        desc="Caching edit embeddings and latents",
    )
    slots = [IMG_MASK] if IMG_MASK in encoded.column_names else []
    return encoded.with_format("torch", columns=["prompt_embeds", "prompt_length", "height", "width",
                                                 *[f"{c}_latents" for c in image_columns],
                                                 REFERENCE_LATENTS, REFERENCE_SHAPES, *slots], output_all_columns=True)


def bucket_key(row_height: int, row_width: int, shapes) -> tuple:
    """Rows batch together only when their target size and every reference grid agree."""
    return (int(row_height), int(row_width), tuple(tuple(int(v) for v in s) for s in np.asarray(shapes).tolist()))


def edit_pools(dataset: Dataset, resolution: int, offset: int = 0) -> dict:
    """``BucketBatchSampler`` pools for an encoded edit dataset: (resolution, "all") -> bucket -> units."""
    meta = dataset.select_columns(["height", "width", REFERENCE_SHAPES]).with_format(None).to_dict()
    buckets: dict = defaultdict(list)
    for i in range(len(dataset)):
        buckets[bucket_key(meta["height"][i], meta["width"][i], meta[REFERENCE_SHAPES][i])].append([offset + i])
    return {(resolution, "all"): dict(buckets)}


def collate_edit(rows: list[dict], latent_columns: Sequence[str] = ("image_latents",)) -> dict:
    """:func:`collate_encoded` plus ``references`` (:class:`qwen_image.References`) for the batch."""
    batch = collate_encoded(rows, latent_columns)
    shapes = {tuple(map(tuple, torch.as_tensor(r[REFERENCE_SHAPES]).tolist())) for r in rows}
    if len(shapes) > 1:
        raise ValueError("a batch mixes reference sizes; use the edit bucket pools (align.data.edit.edit_pools).")
    latents = torch.stack([torch.as_tensor(r[REFERENCE_LATENTS]) for r in rows])
    batch["references"] = References(latents, list(shapes.pop()))
    batch.pop(REFERENCE_LATENTS, None)
    batch.pop(REFERENCE_SHAPES, None)
    if IMG_MASK in rows[0]:
        # Padded like the embeddings; rows of one bucket share a layout (controls come before the instruction).
        slots = torch.zeros(batch["prompt_embeds"].shape[:2], dtype=torch.bool)
        for i, r in enumerate(rows):
            row = torch.as_tensor(r[IMG_MASK]).bool()
            slots[i, : row.shape[0]] = row
        batch[IMG_MASK] = slots
    return batch


def load_edit_preference_dataset(
    name: str,
    split: str = "train",
    prompt_column: str = "prompt",
    min_agreement: float = 0.0,
    control_columns: Sequence[str] = CONTROL_COLUMNS,
    list_column: str = CONTROL_LIST_COLUMN,
    num_control_images: int = 0,
):
    """Edit preference pairs: rows ``prompt`` (the instruction), ``chosen``, ``rejected`` and 1-3 control images
    (the columns of :func:`load_edit_dataset`). The pair checks are T2I's (:mod:`align.data.preference`); a bad
    control image is an error naming the rows (a pair without its source cannot be judged)."""
    from .preference import load_preference_dataset
    from .ratings import describe_row, raise_bad_rows

    pairs, report = load_preference_dataset(name, split, prompt_column, min_agreement)
    path = Path(name).expanduser()
    meta = path if path.is_file() else metadata_path(path, split) if path.is_dir() else None
    pairs = with_control_list(pairs, meta.parent if meta else None, control_columns, list_column)
    bad = []
    for i, row in enumerate(pairs.select_columns([CONTROLS])):
        why = control_problem(row, num_control_images)
        if why:
            bad.append(f"{describe_row(i)}: {why}")
    if bad:
        raise_bad_rows(bad, "pair(s) with bad control images")
    return pairs, report


def write_synthetic_edit_pairs(folder: str | Path, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Demo/test edit pairs: T2I's synthetic pairs (chosen consistently brighter than rejected) plus a control
    image per row (the same texture at mid brightness). A DPO run on them must reach high implicit accuracy."""
    import json

    from .preference import write_synthetic_pairs

    folder = write_synthetic_pairs(folder, n=n, size=size, seed=seed)
    lines = []
    for i, line in enumerate((folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        chosen = np.asarray(Image.open(folder / row["chosen"]), dtype=np.int16)
        Image.fromarray((chosen - 80).clip(0, 255).astype(np.uint8)).save(folder / f"s{i}.png")
        row["prompt"] = f"make photo {i % 7} brighter"
        row["control_image"] = f"s{i}.png"
        lines.append(json.dumps(row) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines), encoding="utf-8")
    return folder


def write_synthetic_edit_prompts(folder: str | Path, n: int = 4, size: int = 32, seed: int = 0) -> Path:
    """Demo/test GRPO prompts for edit models: ``prompts.jsonl`` rows of an instruction and a control image (a
    random texture of ``size`` px, ``s<i>.png`` next to the file). Returns the prompt file."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        texture = (rng.random((max(1, size // 8), max(1, size // 8), 3)) * 255).astype(np.uint8)
        Image.fromarray(texture).resize((size, size), Image.NEAREST).save(folder / f"s{i}.png")
        lines.append(json.dumps({"prompt": f"make photo {i} brighter", "control_image": f"s{i}.png"}) + "\n")
    (folder / "prompts.jsonl").write_text("".join(lines), encoding="utf-8")
    return folder / "prompts.jsonl"
