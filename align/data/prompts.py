"""Prompt sets for online RL (GRPO): a ``prompt`` column plus any columns the rewards read (e.g. ``text``).

Sources, exactly one of:
- ``dataset_name`` (``grpo_dataset_name`` in the combined trainer): a file (.jsonl/.json/.csv/.parquet; .txt = one
  prompt a line), a folder written by ``Dataset.save_to_disk``, or any local ``datasets`` folder/script;
- ``train_prompts``: inline prompts, or ONE entry naming a prompt file (``--train_prompts data/prompts.jsonl``),
  which is read as that file: a file name is never trained on as a prompt.
Setting both is an error (which one wins would be a silent guess). Blank prompts are skipped.

Edit models (``edit=EditPromptColumns(...)``): each row is an instruction plus 1-3 control images, in the columns edit SFT reads
(``control_image`` / ``control_image_1`` / ``control_image_2``, or one ``control_images`` list; paths relative to
the prompt file, or to the folder holding a ``metadata.jsonl``). They are gathered into one ``control_images``
column (``align.data.edit``) and every row is checked: a missing or unreadable image, a gap in the numbering or
more than 3 images is one error naming the rows. Inline prompts cannot carry images, so they are refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from datasets import Dataset, load_dataset

from qwen_image.errors import UserError

from .edit import CONTROL_COLUMNS, CONTROL_LIST_COLUMN, CONTROLS, control_problem, with_control_list
from .loading import mixed_types, read_jsonl_rows
from .sources import load_source, metadata_path

logger = logging.getLogger(__name__)

PROMPT_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def _read_jsonl(path: Path) -> Dataset:
    rows = read_jsonl_rows(path, example='{"prompt": "..."}')
    keys = list(dict.fromkeys(k for r in rows for k in r))
    try:
        return Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})
    except Exception as err:  # pyarrow type clash: name the file instead of a pyarrow traceback
        raise UserError(f"{path}: {mixed_types(rows) or f'a column has values of mixed types ({type(err).__name__})'}") from None


def _read_prompt_file(path: Path) -> Dataset:
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise UserError(f"cannot read prompts from {path.name!r}: use .jsonl, .json, .csv, .parquet or .txt")
    if not path.read_bytes().strip():
        raise UserError(f"prompt file {path} is empty: add one prompt per line (.txt) or {{\"prompt\": ...}} rows")
    if suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return Dataset.from_dict({"prompt": [line for line in lines if line]})
    if suffix == ".jsonl":
        return _read_jsonl(path)
    try:
        return load_dataset("json" if suffix == ".json" else suffix[1:], data_files=str(path), split="train")
    except Exception as err:
        raise UserError(f"cannot read prompt file {path}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None


def _names_a_file(prompts: Sequence[str]) -> Path | None:
    if len(prompts) != 1:
        return None
    path = Path(str(prompts[0])).expanduser()
    if path.is_file():
        return path
    if path.suffix.lower() in PROMPT_FILE_SUFFIXES and "\n" not in str(prompts[0]) and " " not in str(prompts[0]):
        raise UserError(f"train_prompts {prompts[0]!r} looks like a prompt file, but it does not exist")
    return None


@dataclass
class EditPromptColumns:
    """Where an edit prompt set keeps its control images (the edit SFT config fields of the same names)."""

    control_columns: Sequence[str] = CONTROL_COLUMNS
    list_column: str = CONTROL_LIST_COLUMN
    num_control_images: int = 0  # > 0: every row must have exactly this many


def load_prompt_dataset(
    dataset_name: str | None = None,
    prompts: Sequence[str] | None = None,
    split: str = "train",
    prompt_column: str = "prompt",
    edit: EditPromptColumns | None = None,
) -> Dataset:
    """Prompts from ``dataset_name`` or ``prompts`` (see the module docstring). The result has a ``prompt`` column
    with no blank prompts; with ``edit``, also a checked ``control_images`` column."""
    prompts = list(prompts or [])
    if prompts and dataset_name:
        raise UserError(f"both a prompt dataset ({dataset_name}) and inline train_prompts are set: keep one "
                        f"(--train_prompts FILE also replaces a recipe's inline prompts)")
    prompt_file = _names_a_file(prompts) if prompts else None
    base = None  # the folder relative control-image paths resolve against
    if prompt_file is not None:
        ds, base = _read_prompt_file(prompt_file), prompt_file.parent
    elif prompts:
        if edit is not None:
            raise UserError("an edit model's prompts need their control images: give a prompt file (.jsonl rows "
                            '{"prompt": ..., "control_image": "src.png"}) instead of inline train_prompts')
        ds = Dataset.from_dict({"prompt": [str(p) for p in prompts]})
    elif dataset_name:
        path = Path(dataset_name).expanduser()
        # an edit folder: metadata.jsonl next to the control images, whose relative paths resolve against it
        meta = metadata_path(path, split) if edit is not None and path.is_dir() else None
        ds = load_source(dataset_name, split, file=_read_prompt_file,
                         metadata=_read_prompt_file if edit is not None else None, what="prompt dataset")
        base = meta.parent if meta is not None else (path.parent if path.is_file() else None)
    else:
        raise UserError("no prompts: set dataset_name (a .jsonl with a 'prompt' column) or train_prompts.")
    if prompt_column != "prompt" and prompt_column in ds.column_names:
        ds = ds.rename_column(prompt_column, "prompt")
    if "prompt" not in ds.column_names:
        raise UserError(f"the prompt dataset has no {prompt_column!r} column (columns: {ds.column_names}).")
    blank = [i for i, p in enumerate(ds["prompt"]) if not isinstance(p, str) or not p.strip()]
    if blank:
        logger.warning("skipping %d blank prompt(s) (rows %s)", len(blank), blank[:5])
        keep = sorted(set(range(len(ds))) - set(blank))
        ds = ds.select(keep)
    if len(ds) == 0:
        raise UserError("the prompt dataset is empty" + (f" ({len(blank)} blank prompts skipped)" if blank else "") + ".")
    return ds if edit is None else _with_checked_controls(ds, base, edit)


def _with_checked_controls(ds: Dataset, base: Path | None, edit: EditPromptColumns) -> Dataset:
    """The edit rows' control images gathered into ``control_images`` and checked (edit SFT's checks)."""
    from .ratings import describe_row, raise_bad_rows

    try:
        ds = with_control_list(ds, base, edit.control_columns, edit.list_column)
    except ValueError as err:
        raise UserError(f"edit prompts: {err}") from None
    bad = []
    for i, row in enumerate(ds.select_columns([CONTROLS])):
        why = control_problem(row, edit.num_control_images)
        if why:
            bad.append(f"{describe_row(i)}: {why}")
    if bad:
        raise_bad_rows(bad, "edit prompt row(s) with bad control images", hint="Fix the prompt file.")
    return ds


def collate_prompts(rows: list[dict]) -> dict[str, list]:
    """A batch of prompt rows -> column lists (no tensors: the trainer generates the images)."""
    keys = rows[0].keys()
    return {k: [r[k] for r in rows] for k in keys}
