"""Which candidate pairs to send to the raters when the budget is smaller than the pairs: pure functions, no model.

- ``random``: a seeded uniform sample (the baseline every other strategy must beat).
- ``uncertain``: the pairs the current preference model is least sure about, ``|p - 0.5|`` smallest, where ``p``
  is its probability that the raters prefer image a. Assumes the model is calibrated enough that ``p`` near 0.5
  means "could go either way" (rather than "the model has never seen anything like this"), and that those pairs
  are not simply near-identical images that no rater can tell apart either.
- ``disagree``: the pairs where the preference model and an automatic reward (OCR, a CLIP score...) disagree
  most: the reward prefers one side and the model is confident of the other. Assumes both carry signal, so a
  confident disagreement marks a blind spot of one of them that a human label settles.

Ties in the selection score are broken by ``pair_id`` so the choice does not depend on the order of the rows.
"""
from __future__ import annotations

import random
from typing import Sequence

from .errors import AnnotationError

STRATEGIES = ("random", "uncertain", "disagree")


def selection_scores(strategy: str, probs: Sequence[float] | None = None,
                     reward_margins: Sequence[float] | None = None) -> list[float]:
    """Per pair, how much labelling it is expected to teach (higher first) for ``uncertain`` / ``disagree``.

    ``probs[i]``: the preference model's P(a preferred over b); ``reward_margins[i]``: reward(a) - reward(b).
    ``uncertain``: ``-|p - 0.5|``. ``disagree``: ``-(p - 0.5) * sign(margin)``, in [-0.5, 0.5]: positive when
    the model leans the other way than the reward, largest when it is sure of it; 0 when the reward sees a tie.
    """
    if strategy not in ("uncertain", "disagree"):
        raise AnnotationError(f"no selection score for strategy {strategy!r} (uncertain or disagree)")
    if probs is None:
        raise AnnotationError(f"--select {strategy} needs a preference model (--preference-model PATH)")
    for p in probs:
        if not 0.0 <= p <= 1.0:
            raise AnnotationError(f"a preference probability {p} is outside [0, 1]")
    if strategy == "uncertain":
        return [-abs(p - 0.5) for p in probs]
    if reward_margins is None:
        raise AnnotationError("--select disagree needs an automatic reward (--reward NAME) to disagree with")
    if len(reward_margins) != len(probs):
        raise AnnotationError(f"{len(reward_margins)} reward margins for {len(probs)} pairs")
    return [-(p - 0.5) * ((m > 0) - (m < 0)) for p, m in zip(probs, reward_margins)]


def select_pairs(pairs: Sequence[dict], budget: int, strategy: str = "random", *,
                 probs: Sequence[float] | None = None, reward_margins: Sequence[float] | None = None,
                 seed: int = 0) -> list[int]:
    """Indices (in input order) of the ``budget`` pairs to annotate. ``pairs`` need a ``pair_id`` (tie-break).

    ``random`` is a seeded sample; ``uncertain`` / ``disagree`` take the highest :func:`selection_scores`.
    A budget at least the number of pairs selects them all.
    """
    if strategy not in STRATEGIES:
        raise AnnotationError(f"unknown selection {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if budget < 1:
        raise AnnotationError(f"--budget must be at least 1, got {budget}")
    n = len(pairs)
    if probs is not None and len(probs) != n:
        raise AnnotationError(f"{len(probs)} preference probabilities for {n} pairs")
    if strategy == "random":
        chosen = random.Random(seed).sample(range(n), min(budget, n))
    else:
        scores = selection_scores(strategy, probs, reward_margins)
        order = sorted(range(n), key=lambda i: (-scores[i], str(pairs[i].get("pair_id", i))))
        chosen = order[:budget]
    return sorted(chosen)
