"""Progressive training schedule (the Qwen-Image recipe trains low resolution first, then higher, shifting the
data mix and lowering the LR): phases by training progress, declared in the recipe YAML::

    phases:
      - {until: 0.5, resolution: 512, synthetic_fraction: 0.5}
      - {until: 1.0, resolution: 1024, synthetic_fraction: 0.2, lr_scale: 0.5}

``until`` is the fraction of ``max_steps`` at which the phase ends; unset fields keep the run's defaults
(``resolution``: the config's; ``synthetic_fraction``: no mix, rows drawn as they come; ``lr_scale``: 1).
"""

from __future__ import annotations

import json
import random
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


class PhaseSchedule:
    """Which phase an optimizer step is in, and which data pool a batch comes from."""

    def __init__(self, phases: list[Phase], max_steps: int, seed: int = 0):
        if phases and max_steps <= 0:
            raise UserError("phases need max_steps > 0 (they are fractions of the run)")
        self.phases, self.max_steps, self.seed = phases, max_steps, seed

    def phase_index(self, step: int) -> int:
        progress = step / self.max_steps
        for i, phase in enumerate(self.phases):
            if progress < phase.until:
                return i
        return len(self.phases) - 1

    def phase(self, step: int) -> Phase:
        return self.phases[self.phase_index(step)]

    def lr_scale(self, step: int) -> float:
        return self.phase(step).lr_scale if self.phases else 1.0

    @property
    def resolutions(self) -> list[int]:
        return sorted({p.resolution for p in self.phases})

    def pool_for_batch(self, batch_number: int, batches_per_step: int) -> tuple[int, str]:
        """(resolution, source) for a batch: source is ``synthetic``/``real`` by the phase's fraction (seeded by the
        batch number, so resume repeats it), or ``all`` when the phase sets no mix."""
        phase = self.phase(batch_number // max(1, batches_per_step))
        if phase.synthetic_fraction is None:
            return phase.resolution, "all"
        draw = random.Random(f"{self.seed}/mix/{batch_number}").random()
        return phase.resolution, "synthetic" if draw < phase.synthetic_fraction else "real"

