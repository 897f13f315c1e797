"""DiffusionNFT (Zheng et al., arXiv 2509.16117) as pure functions: the per-timestep loss on implicit positive /
negative velocities, the advantage -> optimality mapping, the old-policy EMA schedules and the EMA update itself.
Formulas, conventions and why: docs/math.md ("DiffusionNFT").

The trainer owns the models: ``v`` is the trained policy's velocity (with gradients), ``v_old`` the sampling
("old") policy's and ``v_ref`` the reference's (adapters off), all at the same ``x_t = (1 - t) x0 + t eps``
rebuilt from a stored clean rollout ``x0`` with fresh noise.
"""

from __future__ import annotations

from typing import Iterable

import torch

NFT_MIX_BETA = 1.0            # the paper's default mix coefficient
NFT_MIX_BETA_OCR = 0.1        # the OCR config and the published Qwen-Image LoRA recipe
NFT_ADV_CLIP_MAX = 5.0        # advantages clipped to +-5 and mapped onto [0, 1]; also the loss's extra factor
NFT_KL_COEF = 1e-4            # weight of mean((v - v_ref)^2)
NFT_WEIGHT_FLOOR = 1e-5       # floor of the adaptive per-sample weights
# Old-policy EMA schedules: default d = min(0.001 step, 0.5); OCR: 0 for 75 steps, then min(0.0075 (step - 75), 0.999)
NFT_DECAY_RATE, NFT_DECAY_CAP = 0.001, 0.5
NFT_OCR_DECAY_DELAY, NFT_OCR_DECAY_RATE, NFT_OCR_DECAY_CAP = 75, 0.0075, 0.999


def _dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def nft_optimality(advantages: torch.Tensor, adv_clip_max: float = NFT_ADV_CLIP_MAX) -> torch.Tensor:
    """Optimality weight ``r01 = clamp(clip(A, -m, m) / m / 2 + 0.5, 0, 1)`` (float64, no gradient): the advantage
    range [-m, m] mapped linearly onto [0, 1] (0: train only the negative branch, 1: only the positive one)."""
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    a = advantages.detach().double().clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def nft_implicit_velocities(
    v: torch.Tensor, v_old: torch.Tensor, beta: float = NFT_MIX_BETA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit positive / negative velocities ``v_pos = beta v + (1 - beta) v_old``, ``v_neg = (1 + beta) v_old -
    beta v``, written as ``v_old +- beta (v - v_old)``: the same numbers, but when ``v == v_old`` (before any update)
    both are exactly ``v`` in any dtype, bf16 included. ``v_old`` carries no gradient."""
    step = beta * (v - v_old.detach())
    v_old = v_old.detach()
    return v_old + step, v_old - step


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor | None,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    beta: float = NFT_MIX_BETA,
    adv_clip_max: float = NFT_ADV_CLIP_MAX,
    kl_coef: float = NFT_KL_COEF,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DiffusionNFT loss of one trained timestep; returns (scalar loss, detached statistics).

    Shapes: ``v``, ``v_old``, ``v_ref``, ``x_t``, ``x0`` (B, ...); ``t`` (B,) the noise level sigma in [0, 1] of
    ``x_t = (1 - t) x0 + t eps``; ``advantages`` (B,) per-prompt group advantages (clipped here)::

        v_pos, v_neg = v_old + beta (v - v_old), v_old - beta (v - v_old)
        x0_pos = x_t - t v_pos,  x0_neg = x_t - t v_neg
        w_pos = max(mean_dims|x0_pos - x0|, 1e-5)          (float64, no gradient), w_neg likewise
        L_pos = mean_dims((x0_pos - x0)^2 / w_pos),  L_neg likewise (float64)
        policy = mean_batch((r01 L_pos + (1 - r01) L_neg) / beta) * adv_clip_max
        loss = policy + kl_coef * mean_batch(mean_dims((v - v_ref)^2))

    ``v_old``, ``v_ref``, ``x_t``, ``x0``, ``t`` are detached: only ``v`` receives gradients. ``v_ref`` may be None
    only with ``kl_coef == 0``. Work happens in float32 at least (float64 for the weights and the policy term, as in
    the official code, where the float64 weights promote the division). Statistics: ``policy_loss``,
    ``unweighted_policy_loss`` (before the ``adv_clip_max`` factor), ``loss_pos`` / ``loss_neg``, ``r01_mean``,
    ``kl`` (mean (v - v_ref)^2), ``old_kl`` (mean (v_old - v_ref)^2), and how far the trained policy moved from
    ``old``: ``old_deviation`` (mean |v - v_old|), ``old_deviation_sq`` (mean (v - v_old)^2) and its max.
    """
    if beta <= 0:
        raise ValueError(f"the NFT mix beta must be > 0, got {beta}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if v_ref is None and kl_coef:
        raise ValueError("nft_loss needs v_ref when kl_coef > 0")
    shapes = {tuple(x.shape) for x in (v, v_old, x_t, x0) + (() if v_ref is None else (v_ref,))}
    if len(shapes) != 1:
        raise ValueError(f"v, v_old, v_ref, x_t and x0 must have the same shape, got {sorted(shapes)}")
    batch = v.shape[0]
    if t.shape != (batch,) or advantages.shape != (batch,):
        raise ValueError(f"t and advantages must have shape ({batch},), got {tuple(t.shape)} and {tuple(advantages.shape)}")
    dtype = torch.promote_types(v.dtype, torch.float32)
    dims = _dims(v)
    v_c, v_old_c = v.to(dtype), v_old.detach().to(dtype)
    x_t_c, x0_c = x_t.detach().to(dtype), x0.detach().to(dtype)
    t_c = t.detach().to(dtype).view(-1, *([1] * (v.dim() - 1)))
    r01 = nft_optimality(advantages, adv_clip_max).to(v.device)

    v_pos, v_neg = nft_implicit_velocities(v_c, v_old_c, beta)
    x0_pos = x_t_c - t_c * v_pos
    x0_neg = x_t_c - t_c * v_neg
    with torch.no_grad():
        # Adaptive weights: each sample's error is normalised by its own mean absolute x0 error, so easy and hard
        # samples (and noise levels) contribute on one scale.
        w_pos = (x0_pos.double() - x0_c.double()).abs().mean(dim=dims, keepdim=True).clamp_min(NFT_WEIGHT_FLOOR)
        w_neg = (x0_neg.double() - x0_c.double()).abs().mean(dim=dims, keepdim=True).clamp_min(NFT_WEIGHT_FLOOR)
    loss_pos = ((x0_pos - x0_c) ** 2 / w_pos).mean(dim=dims)
    loss_neg = ((x0_neg - x0_c) ** 2 / w_neg).mean(dim=dims)
    # Dividing by beta keeps the gradient's size independent of beta (v enters v_pos / v_neg scaled by beta).
    unweighted = (r01 * loss_pos + (1.0 - r01) * loss_neg) / beta
    policy = (unweighted * adv_clip_max).mean()
    loss = policy
    stats = {}
    if v_ref is not None:
        v_ref_c = v_ref.detach().to(dtype)
        kl = ((v_c - v_ref_c) ** 2).mean(dim=dims).mean()
        if kl_coef:
            loss = loss + kl_coef * kl
        stats["kl"] = float(kl.detach())
        stats["old_kl"] = float(((v_old_c - v_ref_c) ** 2).mean())
    with torch.no_grad():
        moved = v_c.detach() - v_old_c
        stats.update({
            "policy_loss": float(policy.detach()),
            "unweighted_policy_loss": float(unweighted.detach().mean()),
            "loss_pos": float(loss_pos.detach().mean()),
            "loss_neg": float(loss_neg.detach().mean()),
            "r01_mean": float(r01.mean()),
            "old_deviation": float(moved.abs().mean()),
            "old_deviation_sq": float((moved**2).mean()),
            "old_deviation_sq_max": float((moved**2).max()),
        })
    return loss, stats


# ---------------------------------------------------------------- the old policy: EMA schedules and update
def linear_decay(step: int, rate: float = NFT_DECAY_RATE, cap: float = NFT_DECAY_CAP) -> float:
    """``min(rate * step, cap)``: NFT's default old-policy decay (0.001, 0.5); AWM's EMA-KL adapter uses (0.001, 0.3)."""
    return delayed_linear_decay(step, 0, rate, cap)


def delayed_linear_decay(
    step: int, delay: int = NFT_OCR_DECAY_DELAY, rate: float = NFT_OCR_DECAY_RATE, cap: float = NFT_OCR_DECAY_CAP
) -> float:
    """0 for ``step < delay`` (``old`` copies the trained policy), then ``min(rate * (step - delay), cap)``: NFT's OCR
    schedule (75, 0.0075, 0.999), also the one the published Qwen-Image recipe uses."""
    if step < 0 or delay < 0 or rate < 0 or not 0 <= cap < 1:
        raise ValueError(f"decay schedule needs step, delay, rate >= 0 and 0 <= cap < 1, got {step}, {delay}, {rate}, {cap}")
    if step < delay:
        return 0.0
    return min((step - delay) * rate, cap)


@torch.no_grad()
def ema_update_(old_params: Iterable[torch.Tensor], new_params: Iterable[torch.Tensor], decay: float) -> None:
    """In place: ``old <- decay * old + (1 - decay) * new`` for each pair (the official update, same operation order).

    ``decay == 0`` copies ``new`` exactly (the early steps of the delayed schedule). Pairs must match in shape.
    """
    if not 0 <= decay <= 1:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    old_params, new_params = list(old_params), list(new_params)
    if len(old_params) != len(new_params):
        raise ValueError(f"EMA update over {len(old_params)} old and {len(new_params)} new tensors")
    for old, new in zip(old_params, new_params):
        if old.shape != new.shape:
            raise ValueError(f"EMA update between shapes {tuple(old.shape)} and {tuple(new.shape)}")
        if decay == 0:
            old.copy_(new)
        else:
            old.copy_(old * decay + new.to(old.dtype) * (1.0 - decay))
