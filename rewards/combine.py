"""Weighted combination of rewards, with per-reward lists for logging, and per-prompt advantages."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from .registry import get_reward, reward_name

__all__ = ["CombinedReward", "CombinedResult", "combine", "per_prompt_advantages", "mean_ignore_none"]

NONE_MODES = ("renormalize", "skip", "zero")


@dataclass
class CombinedResult:
    """``total[i]`` is the weighted combination for sample i; ``per_reward[name][i]`` the raw reward value.

    ``weights`` maps each name to its weight. :meth:`means` gives the mean of each list, ignoring None, for
    logging (e.g. ``wandb.log({f"reward/{k}": v for k, v in res.means().items()})``).
    """

    total: list[float | None]
    per_reward: dict[str, list[float | None]]
    weights: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float | None]:
        out = {k: mean_ignore_none(v) for k, v in self.per_reward.items()}
        out["total"] = mean_ignore_none(self.total)
        return out


def mean_ignore_none(values: Sequence[float | None]) -> float | None:
    """Mean of the non-None values; None when there are none."""
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class CombinedReward:
    """A weighted sum of rewards; itself a reward (``__call__`` returns the totals).

    ``rewards`` is a list of registry names / reward callables / ``(name, kwargs)`` pairs, or a
    ``{name: weight}`` mapping. ``weights`` default to 1.0 each. ``reward_kwargs`` maps a name to the
    keyword options passed to :func:`rewards.get_reward`. :meth:`compute` returns a :class:`CombinedResult`
    with the per-reward lists so trainers can log each reward.

    None handling (``none_mode``), for sample i with rewards A (available, not None):
      * ``"renormalize"`` (default): ``sum_A w_k r_k * sum_all |w_k| / sum_A |w_k|`` - the weighted sum
        rescaled as if the missing rewards had scored like the available ones; equal to the plain weighted
        sum when nothing is missing.
      * ``"skip"``: ``sum_A w_k r_k`` (missing rewards add 0 and the scale shrinks).
      * ``"zero"``: None counts as 0.0 (same as skip, but an all-None sample gives 0.0 instead of None).
    In "renormalize" and "skip" a sample where every reward is None gets None (excluded from means). A
    weight of 0 still computes (and logs) the reward but does not affect the total.
    """

    def __init__(self, rewards: Sequence[Any] | Mapping[str, float], weights: Sequence[float] | None = None, *,
                 reward_kwargs: Mapping[str, Mapping[str, Any]] | None = None, none_mode: str = "renormalize"):
        if none_mode not in NONE_MODES:
            raise ValueError(f"none_mode must be one of {NONE_MODES}, got {none_mode!r}")
        if isinstance(rewards, Mapping):
            if weights is not None:
                raise ValueError("give weights either in the mapping or as `weights`, not both")
            rewards, weights = list(rewards.keys()), list(rewards.values())
        rewards = list(rewards)
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"{len(weights)} weights for {len(rewards)} rewards")
        if any(not math.isfinite(w) for w in weights):
            raise ValueError("weights must be finite")
        reward_kwargs = dict(reward_kwargs or {})
        self.fns: list[Callable] = []
        self.names: list[str] = []
        for r in rewards:
            if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str):
                name, fn = r[0], get_reward(r[0], **dict(r[1]))
            elif isinstance(r, str):
                name, fn = r, get_reward(r, **dict(reward_kwargs.get(r, {})))
            elif callable(r):
                name, fn = reward_name(r), r
            else:
                raise TypeError(f"not a reward: {r!r}")
            base, n = name, 2
            while name in self.names:  # same reward twice (e.g. with other options)
                name, n = f"{base}_{n}", n + 1
            self.names.append(name)
            self.fns.append(fn)
        self.weights = dict(zip(self.names, weights))
        self.none_mode = none_mode
        self.reward_name = "combined"

    def compute(self, prompts: list[str], images: list[Image.Image], **columns: Any) -> CombinedResult:
        """Run every reward once and combine; see the class docstring for None handling."""
        n = len(prompts)
        per: dict[str, list[float | None]] = {}
        for name, fn in zip(self.names, self.fns):
            vals = list(fn(prompts, images, **columns))
            if len(vals) != n:
                raise ValueError(f"reward {name!r} returned {len(vals)} values for {n} prompts")
            per[name] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
                         for v in vals]
        total_abs = sum(abs(w) for w in self.weights.values())
        totals: list[float | None] = []
        for i in range(n):
            avail = [(self.weights[k], per[k][i]) for k in self.names if per[k][i] is not None]
            if not avail:
                totals.append(0.0 if self.none_mode == "zero" else None)
                continue
            s = sum(w * v for w, v in avail)
            if self.none_mode == "renormalize":
                a = sum(abs(w) for w, _ in avail)
                s = s * total_abs / a if a > 0 else 0.0
            totals.append(s)
        return CombinedResult(totals, per, dict(self.weights))

    def __call__(self, prompts: list[str], images: list[Image.Image], **columns: Any) -> list[float | None]:
        return self.compute(prompts, images, **columns).total

    def __repr__(self) -> str:
        return f"CombinedReward({self.weights}, none_mode={self.none_mode!r})"


def combine(rewards: Sequence[Any] | Mapping[str, float], weights: Sequence[float] | None = None,
            **kwargs: Any) -> CombinedReward:
    """Shorthand for :class:`CombinedReward` (``combine({"ocr": 1.0, "pickscore": 0.5}, reward_kwargs=...)``)."""
    return CombinedReward(rewards, weights, **kwargs)


def per_prompt_advantages(prompts: Sequence[str], rewards: Sequence[float | None], *, eps: float = 1e-4,
                          global_std: bool = False, clip: float | None = None) -> list[float]:
    """Group-relative advantages ``(r - mean_group) / (std_group + eps)``, groups = identical prompts.

    ``global_std=True`` uses the std over the whole batch (flow_grpo's option). Population std (ddof 0).
    Samples with a None reward get advantage 0.0 and are left out of the statistics. ``clip`` bounds |A|.
    """
    if len(prompts) != len(rewards):
        raise ValueError("prompts and rewards differ in length")

    def _std(xs: list[float]) -> float:
        if len(xs) < 2:
            return 0.0
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))

    groups: dict[str, list[int]] = {}
    for i, (p, r) in enumerate(zip(prompts, rewards)):
        if r is not None:
            groups.setdefault(p, []).append(i)
    gstd = _std([float(r) for r in rewards if r is not None]) if global_std else None
    adv = [0.0] * len(rewards)
    for idx in groups.values():
        vals = [float(rewards[i]) for i in idx]
        m = sum(vals) / len(vals)
        sd = gstd if global_std else _std(vals)
        for i, v in zip(idx, vals):
            a = (v - m) / (sd + eps)
            adv[i] = max(-clip, min(clip, a)) if clip is not None else a
    return adv
