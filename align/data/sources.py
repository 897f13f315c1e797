"""Where a dataset's rows come from: the one place that turns a ``dataset_name`` into rows, for training images
(``loading.load_image_dataset``), preference pairs (``preference.load_preference_dataset``) and GRPO prompt sets
(``prompts.load_prompt_dataset``). Each caller passes the readers its data needs (how a ``metadata.jsonl`` or a
file becomes rows) and keeps its own column checks; the order of the checks and the errors for a name that
matches nothing are the same for all of them.

Resolution order:

1. a folder with ``metadata.jsonl`` (at its root, or in ``<split>/``): the caller's ``metadata`` reader;
2. a file: the caller's ``file`` reader (default: ``datasets``' loader for its type);
3. a folder written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` from which ``split`` is taken);
4. any other existing local folder or file: ``datasets.load_dataset(path, split=split)``;
5. with ``hub=True``, a Hub dataset name already in the local cache (never a download attempt: asking the Hub
   for a name that is not there retries for about 30 s);

anything else is a one-line ``UserError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from datasets import Dataset, load_dataset, load_from_disk

from qwen_image.errors import UserError

METADATA_FILE = "metadata.jsonl"

Reader = Callable[[Path], Dataset]


def metadata_path(folder: Path, split: str = "train") -> Path | None:
    """The imagefolder ``metadata.jsonl`` of ``folder`` (at its root, or under ``<split>/``), or None."""
    for candidate in (folder / METADATA_FILE, folder / split / METADATA_FILE):
        if candidate.is_file():
            return candidate
    return None


def load_source(
    name: str,
    split: str = "train",
    *,
    metadata: Reader | None = None,
    file: Reader | None = None,
    hub: bool = False,
    what: str = "dataset",
) -> Dataset:
    """The rows ``name`` points at (resolution order in the module docstring). ``metadata`` reads a
    ``metadata.jsonl`` (None: such folders go to ``datasets``' loader like any other folder); ``file`` reads a
    file; ``hub`` allows a cached Hub dataset; ``what`` names the data in the not-found error."""
    path = Path(name).expanduser()
    meta = metadata_path(path, split) if metadata is not None and path.is_dir() else None
    if meta is not None:
        return metadata(meta)
    if path.is_file() and file is not None:
        return file(path)
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return load_from_disk(str(path))
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = load_from_disk(str(path))
        if split not in splits:
            raise UserError(f"split {split!r} not in {name!r} (splits: {list(splits)}).")
        return splits[split]
    if path.exists():
        return read_local_dataset(path, split)
    if hub and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and _in_hub_cache(name):
        try:
            return load_dataset(name, split=split)
        except Exception as err:
            raise UserError(f"{what} {name!r} could not be loaded from the local Hub cache ({type(err).__name__})") from None
    if hub:
        raise UserError(f"{what} {name!r} not found: no such local folder or file (nor a Hub dataset in the local cache)")
    raise UserError(f"{what} {name!r} not found (give a local folder or file).")


def read_local_dataset(path: Path, split: str = "train") -> Dataset:
    """Any other local folder/file ``datasets`` can read; what it cannot read is the user's data, said in one line."""
    try:
        return load_dataset(str(path), split=split)
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise UserError(f"{path}: not a dataset this tool can read (want a folder with metadata.jsonl, a "
                        f"save_to_disk folder or a data file): {type(err).__name__}: {detail}") from None


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}").is_dir()
