"""Prompt sets for online RL (GRPO): a ``prompt`` column plus any columns the rewards read (e.g. ``text``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from datasets import Dataset, load_dataset, load_from_disk

from ..errors import UserError

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_prompt_dataset(
    dataset_name: str | None = None,
    prompts: Sequence[str] | None = None,
    split: str = "train",
    prompt_column: str = "prompt",
) -> Dataset:
    """Prompts from inline ``prompts``, a file (.jsonl/.json/.csv/.parquet; .txt = one prompt a line), a folder
    written by ``Dataset.save_to_disk``, or any local ``datasets`` folder/script. The result has a ``prompt`` column."""
    if prompts:
        ds = Dataset.from_dict({"prompt": list(prompts)})
    elif dataset_name:
        path = Path(dataset_name).expanduser()
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"cannot read prompts from {path.name!r}: use .jsonl, .json, .csv, .parquet or .txt.")
            ds = load_dataset(builder, data_files=str(path), split="train")
            if builder == "text":
                ds = ds.rename_column("text", "prompt")
        elif path.is_dir() and (path / "dataset_info.json").is_file():
            ds = load_from_disk(str(path))
        elif path.is_dir() and (path / "dataset_dict.json").is_file():
            ds = load_from_disk(str(path))[split]
        else:
            if not path.exists():
                raise UserError(f"prompt dataset {dataset_name!r} not found (give a local file or folder).")
            ds = load_dataset(str(path), split=split)
    else:
        raise UserError("no prompts: set dataset_name (a .jsonl with a 'prompt' column) or train_prompts.")
    if prompt_column != "prompt" and prompt_column in ds.column_names:
        ds = ds.rename_column(prompt_column, "prompt")
    if "prompt" not in ds.column_names:
        raise UserError(f"the prompt dataset has no {prompt_column!r} column (columns: {ds.column_names}).")
    if len(ds) == 0:
        raise UserError("the prompt dataset is empty.")
    return ds


def collate_prompts(rows: list[dict]) -> dict[str, list]:
    """A batch of prompt rows -> column lists (no tensors: the trainer generates the images)."""
    keys = rows[0].keys()
    return {k: [r[k] for r in rows] for k in keys}
