"""Inter-rater agreement: Fleiss' kappa and Krippendorff's alpha (pure Python, no numpy needed).

Both return ``float('nan')`` when the statistic is undefined (no items, or no variation at all:
expected disagreement is zero).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Iterable, Sequence

__all__ = ["fleiss_kappa", "krippendorff_alpha", "percent_agreement", "nan_to_none"]


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from an items x categories count matrix; every row must sum to the same n >= 2."""
    rows = [list(r) for r in counts if sum(r) > 0]
    if not rows:
        return math.nan
    n = sum(rows[0])
    if n < 2 or any(sum(r) != n for r in rows):
        raise ValueError("fleiss_kappa needs the same number (>= 2) of ratings for every item")
    n_items, n_cat = len(rows), len(rows[0])
    p_j = [sum(r[j] for r in rows) / (n_items * n) for j in range(n_cat)]
    p_i = [(sum(c * c for c in r) - n) / (n * (n - 1)) for r in rows]
    p_bar = sum(p_i) / n_items
    p_e = sum(p * p for p in p_j)
    if math.isclose(p_e, 1.0):
        return math.nan
    return (p_bar - p_e) / (1 - p_e)


def krippendorff_alpha(units: Iterable[Sequence[Hashable | float]], metric: str = "nominal") -> float:
    """Krippendorff's alpha; ``units`` holds, per item, the values given by its raters (missing ones left out).

    ``metric`` is ``"nominal"`` (labels) or ``"interval"`` (numbers, e.g. 1-5 ratings). Units with fewer
    than two values are not pairable and are ignored, as in Krippendorff (2011).
    """
    if metric == "nominal":
        def delta2(a, b):
            return 0.0 if a == b else 1.0
    elif metric == "interval":
        def delta2(a, b):
            return (float(a) - float(b)) ** 2
    else:
        raise ValueError(f"unknown metric {metric!r} (nominal or interval)")

    coincidences: Counter = Counter()
    for unit in units:
        values = list(unit)
        m = len(values)
        if m < 2:
            continue
        for i, a in enumerate(values):
            for j, b in enumerate(values):
                if i != j:
                    coincidences[(a, b)] += 1.0 / (m - 1)
    if not coincidences:
        return math.nan
    marginals: Counter = Counter()
    for (a, _b), w in coincidences.items():
        marginals[a] += w
    n = sum(marginals.values())
    observed = sum(w * delta2(a, b) for (a, b), w in coincidences.items())
    expected = sum(marginals[a] * marginals[b] * delta2(a, b) for a in marginals for b in marginals)
    if expected == 0:
        return math.nan
    return 1.0 - (n - 1) * observed / expected


def percent_agreement(units: Iterable[Sequence[Hashable]]) -> float:
    """Mean over items (with >= 2 values) of the fraction of rater pairs that agree."""
    scores = []
    for unit in units:
        values = list(unit)
        m = len(values)
        if m < 2:
            continue
        same = sum(c * (c - 1) for c in Counter(values).values())
        scores.append(same / (m * (m - 1)))
    return sum(scores) / len(scores) if scores else math.nan


def nan_to_none(x: float | None) -> float | None:
    """JSON-friendly: NaN becomes None; other floats are rounded to 4 decimals."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), 4)
