"""Progressive training phases as a recipe declares them (option parsing and checks; the schedule that applies
them during training is ``align.data.schedule.PhaseSchedule``)::

    phases:
      - {until: 0.5, resolution: 512, synthetic_fraction: 0.5}
      - {until: 1.0, resolution: 1024, synthetic_fraction: 0.2, lr_scale: 0.5}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qwen_image.errors import UserError

_KEYS = ("until", "resolution", "synthetic_fraction", "lr_scale")


@dataclass(frozen=True)
class Phase:
    until: float
    resolution: int
    synthetic_fraction: float | None = None
    lr_scale: float = 1.0


def parse_phases(raw: Any, default_resolution: int) -> list[Phase]:
    """Phases from the YAML list (or its JSON text on the command line); ``[]`` for none. Validates every field."""
    if raw in (None, "", [], "[]"):
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            import yaml

            raw = yaml.safe_load(raw)
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise UserError("phases must be a list of mappings like {until: 0.5, resolution: 512}")
    phases, last = [], 0.0
    for i, item in enumerate(raw):
        unknown = set(item) - set(_KEYS)
        if unknown:
            raise UserError(f"phase {i}: unknown key(s) {sorted(unknown)}; allowed: {list(_KEYS)}")
        if "until" not in item:
            raise UserError(f"phase {i}: 'until' (fraction of max_steps where the phase ends) is required")
        until = float(item["until"])
        if not last < until <= 1.0:
            raise UserError(f"phase {i}: until must increase and lie in (0, 1], got {until:g} after {last:g}")
        res = int(item.get("resolution") or default_resolution)
        if res <= 0 or res % 16:
            raise UserError(f"phase {i}: resolution must be a positive multiple of 16 px, got {res}")
        frac = item.get("synthetic_fraction")
        if frac is not None and not 0.0 <= float(frac) <= 1.0:
            raise UserError(f"phase {i}: synthetic_fraction must be in [0, 1], got {frac}")
        scale = float(item.get("lr_scale", 1.0))
        if scale <= 0:
            raise UserError(f"phase {i}: lr_scale must be > 0, got {scale:g}")
        phases.append(Phase(until, res, None if frac is None else float(frac), scale))
        last = until
    if last < 1.0:
        raise UserError(f"the last phase must end at until: 1.0 (got {last:g})")
    return phases
