"""Random numbers of online RL as functions of counters, not of a generator's hidden state.

Every random choice of a rollout (initial and SDE noise of each sample, the SDE window, the trained timesteps) is
drawn from a generator seeded by (run seed, purpose, counters...): a resumed run draws the same numbers, and a
sample's noise does not depend on how many processes share the batch.
"""

from __future__ import annotations

import torch

# "purpose" tags: one stream each
SEEDS, WINDOW, TRAIN_STEPS = 1, 2, 3
# forward-process objectives: the fresh noise of x_t and the trained timesteps
FORWARD_NOISE, FORWARD_STEPS = 4, 5


def derived_generator(*indices: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (run seed, purpose, counters): the same tuple, the same draws."""
    h = 0x9E3779B97F4A7C15
    for v in indices:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator("cpu").manual_seed(h & 0x7FFFFFFFFFFFFFFF)


def sample_seeds(run_seed: int, index: int, first: int, n: int) -> list[int]:
    """Seeds (initial + SDE noise) of global samples ``first .. first + n - 1`` of generation batch ``index``."""
    return [int(torch.randint(0, 2**31 - 1, (1,), generator=derived_generator(run_seed, SEEDS, index, first + i)))
            for i in range(n)]
