"""The reward of an online run: one registry reward, or a weighted ``rewards.CombinedReward`` (logs each part)."""

from __future__ import annotations

from typing import Any

from qwen_image.errors import UserError


def build_reward(args: Any, funcs: list[str] | None = None, weights: list[float] | None = None):
    """The configured reward (``args.reward_funcs`` / ``reward_weights`` / ``reward_kwargs``). ``funcs``/``weights``
    name another set (the held-out monitor's); ``reward_kwargs`` apply to both."""
    from rewards import combine

    funcs = list(args.reward_funcs if funcs is None else funcs)
    weights = args.reward_weights if funcs == list(args.reward_funcs) and weights is None else weights
    if not funcs:
        raise UserError("reward_funcs is empty: name at least one reward (see rewards.available_rewards()).")
    kwargs = args.reward_kwargs or {}
    unknown = set(kwargs) - set(args.reward_funcs) - set(args.monitor_reward_funcs or [])
    if unknown:
        raise UserError(f"reward_kwargs for rewards not in reward_funcs: {sorted(unknown)}")
    try:
        return combine(funcs, weights, reward_kwargs={k: v for k, v in kwargs.items() if k in funcs})
    except KeyError as err:
        raise UserError(str(err).strip("'\"")) from None
