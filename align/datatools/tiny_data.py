"""The small synthetic datasets the tiny recipes (``recipes/tiny/*.yaml``) read, written where those recipes look for
them: ``python -m align.datatools tiny-data KIND`` (docs/data-tools.md). CPU, a second or two, no model needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def write_tiny_edit_sft(folder: str | Path, n: int = 8, size: int = 32, seed: int = 0) -> Path:
    """Edit SFT rows in the layout of docs/edit.md: ``metadata.jsonl`` rows of a target image (``file_name``), the
    instruction, its source image (``control_image``) and three ratings. The target is the source's texture made
    brighter, so an edit LoRA has one consistent thing to learn."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        texture = rng.integers(0, 60, (size, size, 3)) + rng.integers(0, 40, 3)
        Image.fromarray((texture + 60).clip(0, 255).astype(np.uint8)).save(folder / f"src{i}.png")
        Image.fromarray((texture + 170).clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
        row = {"file_name": f"{i}.png", "prompt": f"make photo {i % 5} brighter", "control_image": f"src{i}.png",
               "ratings": [5, 5, 4]}
        lines.append(json.dumps(row) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines), encoding="utf-8")
    return folder


def _writers() -> dict[str, tuple[Callable[..., Path], str, int, int]]:
    """kind -> (writer(folder, n, size=..., seed=...), the folder its tiny recipes read, default n, default size)."""
    from ..data.edit import write_synthetic_edit_pairs, write_synthetic_edit_prompts
    from ..data.kto import write_synthetic_ratings
    from ..data.preference import write_synthetic_pairs

    return {
        "edit_sft": (write_tiny_edit_sft, "data/tiny_edit", 8, 32),
        "pairs": (write_synthetic_pairs, "data/tiny_pairs", 16, 64),
        "edit_pairs": (write_synthetic_edit_pairs, "data/tiny_edit_pairs", 16, 32),
        "edit_prompts": (write_synthetic_edit_prompts, "data/tiny_edit_prompts", 4, 32),
        "ratings": (write_synthetic_ratings, "data/tiny_ratings", 48, 32),
    }


KINDS = ("edit_sft", "pairs", "edit_pairs", "edit_prompts", "ratings")


def default_out(kind: str) -> str:
    """The folder the tiny recipes of ``kind`` read."""
    return _writers()[kind][1]


def write_tiny_data(kind: str, out: str | Path | None = None, n: int | None = None, size: int | None = None,
                    seed: int = 0) -> Path:
    """Write the ``kind`` dataset (one of :data:`KINDS`) to ``out`` (default: the folder its tiny recipes read)."""
    writer, default_out, default_n, default_size = _writers()[kind]
    return Path(writer(out or default_out, n or default_n, size=size or default_size, seed=seed))
