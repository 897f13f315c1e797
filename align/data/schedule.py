"""Progressive training schedule (the Qwen-Image recipe trains low resolution first, then higher, shifting the
data mix and lowering the LR): phases by training progress, declared in the recipe YAML::

    phases:
      - {until: 0.5, resolution: 512, synthetic_fraction: 0.5}
      - {until: 1.0, resolution: 1024, synthetic_fraction: 0.2, lr_scale: 0.5}

``until`` is the fraction of ``max_steps`` at which the phase ends; unset fields keep the run's defaults
(``resolution``: the config's; ``synthetic_fraction``: no mix, rows drawn as they come; ``lr_scale``: 1).
"""

from __future__ import annotations

import random

from qwen_image.errors import UserError

from ..configs.phases import Phase, parse_phases

__all__ = ["Phase", "PhaseSchedule", "parse_phases"]

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

