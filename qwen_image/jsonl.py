"""One JSON Lines reader for every package that reads row files (``align/``'s data layer, ``rewards/``'s pairs),
kept in the lowest layer so ``rewards/`` need not import ``align/``. Pure Python: no torch."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

__all__ = ["read_jsonl_objects"]


def read_jsonl_objects(path: Path, row_hint: str = "") -> list[dict]:
    """The JSON objects of a .jsonl file, blank lines skipped; a bad line is a UserError naming file and line
    (``row_hint`` ends the message for a line that is not an object, e.g. ``" with prompt, chosen, rejected"``)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: each line must be a JSON object{row_hint}")
            rows.append(row)
    return rows
