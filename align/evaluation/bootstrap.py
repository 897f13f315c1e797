"""How sure is a gain? A paired percentile bootstrap over sampling seeds.

    gain = bootstrap_gain(sft_scores, aligned_scores)      # (prompts, seeds) arrays, the same seeds in both
    gain["overall"]      # {"gain": 0.12, "low": 0.05, "high": 0.19, "n_prompts": 4, "n_seeds": 16, ...}
    gain["per_prompt"]   # one such dict per prompt (row)

Both models are scored on the same prompts with the same seeds (the same initial noise), so the per-image
differences are paired: the bootstrap resamples seeds (columns) with replacement and recomputes the mean
difference; the interval is the central ``confidence`` quantile range of those means. The overall interval
draws one set of seeds for all prompts (a seed is the unit that was sampled); each prompt's interval draws
its own.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["bootstrap_gain"]


def _interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def bootstrap_gain(
    before: Sequence[Sequence[float]] | np.ndarray,
    after: Sequence[Sequence[float]] | np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Mean of ``after - before`` and its ``confidence`` bootstrap interval over seeds, overall and per prompt.

    ``before`` and ``after`` are (prompts, seeds) score arrays with the same prompts and seeds in the same order
    (a 1-D array is one prompt). Returns ``{"overall": {...}, "per_prompt": [{...}, ...]}``; each entry has
    ``gain`` (mean difference), ``low``/``high`` (the interval), ``before``/``after`` (means), ``n_seeds`` and
    ``excludes_zero`` (the interval lies strictly above or strictly below 0). Deterministic for a given ``seed``.
    """
    b = np.atleast_2d(np.asarray(before, dtype=np.float64))
    a = np.atleast_2d(np.asarray(after, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"before {b.shape} and after {a.shape} must have the same (prompts, seeds) shape")
    if b.shape[1] < 2:
        raise ValueError("a bootstrap over seeds needs at least 2 seeds")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = a - b
    n_prompts, n_seeds = diff.shape
    rng = np.random.default_rng(seed)

    def summary(d: np.ndarray, idx: np.ndarray, rows_b: np.ndarray, rows_a: np.ndarray) -> dict:
        # d: (rows, seeds); idx: (n_resamples, seeds) resampled seed indices shared by the rows
        means = d[:, idx].mean(axis=(0, 2))
        lo, hi = _interval(means, confidence)
        gain = float(d.mean())
        return {"gain": gain, "low": lo, "high": hi, "before": float(rows_b.mean()), "after": float(rows_a.mean()),
                "n_prompts": int(d.shape[0]), "n_seeds": n_seeds, "confidence": confidence,
                "excludes_zero": bool(lo > 0 or hi < 0)}

    overall = summary(diff, rng.integers(0, n_seeds, size=(n_resamples, n_seeds)), b, a)
    per_prompt = [summary(diff[i:i + 1], rng.integers(0, n_seeds, size=(n_resamples, n_seeds)), b[i], a[i])
                  for i in range(n_prompts)]
    return {"overall": overall, "per_prompt": per_prompt, "n_resamples": n_resamples}
