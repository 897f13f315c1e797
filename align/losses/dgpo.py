"""DGPO, group-level preference optimisation (Luo et al., arXiv 2510.08425), as pure functions: the sigmoid weight
of each group's DPO-style score, PPO-style clipping of the flow-matching error in the direction of the advantage,
and the KL term. Groups are given by integer ids, so a group may span processes (pass ``all_reduce``).
Formulas, conventions and why: docs/math.md ("DGPO").
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .grpo import ratio_stats

DGPO_BETA_DPO = 100.0             # frozen reference (CFG and CFG-free configs)
DGPO_CLIP_RANGE = 1e-3            # CFG-free rollouts with a frozen reference
DGPO_BETA_DPO_EMA_REF = 2000.0    # the EMA policy as the score's reference
DGPO_CLIP_RANGE_EMA_REF = 1e-5
DGPO_KL_COEF = 0.02               # mean((v - v_ref)^2), frozen-reference configs
DGPO_KL_COEF_EMA_REF = 1e-3       # the KL (still to the frozen base) in the EMA-reference config
# The EMA reference after the n-th optimizer step: ema <- d ema + (1 - d) trained, d = min(rate n, cap) (n from 0, so
# the first update copies the trained adapter). The official code's schedule: it trails the policy by a few steps.
DGPO_EMA_REF_DECAY_RATE = 1e-3
DGPO_EMA_REF_DECAY_CAP = 0.3
DGPO_ADV_CLIP_MAX = 5.0

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def group_shared_noise(
    group_ids: torch.Tensor, num_groups: int, sample_shape: Sequence[int], generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Noise (B, *sample_shape) that every member of a group shares: one draw per group id from ``generator`` (on the
    CPU), indexed by ``group_ids``. Seed the generator identically on every process and pass GLOBAL group ids: the
    processes then agree on each group's noise without a broadcast, and a resumed run repeats it."""
    if group_ids.dim() != 1 or (group_ids.numel() and (int(group_ids.min()) < 0 or int(group_ids.max()) >= num_groups)):
        raise ValueError(f"group_ids must be a 1-d tensor of ids in [0, {num_groups})")
    table = torch.randn(num_groups, *sample_shape, generator=generator, dtype=dtype)
    return table[group_ids.cpu()].to(group_ids.device)


def dgpo_group_weights(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    advantages: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    beta_dpo: float = DGPO_BETA_DPO,
    all_reduce: AllReduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample group weight ``sigmoid(s_G)`` (B,) and the group scores ``s_G`` (num_groups,), no gradient::

        s_G = sum_{i in G} A_i * beta_dpo * (err_i - ref_err_i) / |G|

    The sums and the member counts are reduced with ``all_reduce`` (a SUM over processes returning the result, e.g.
    ``lambda x: accelerator.reduce(x, "sum")``; default: this process only), so ``group_ids`` must be global ids in
    ``[0, num_groups)``, the same numbering on every process. A group absent everywhere gets score 0.
    """
    reduce = all_reduce or _identity
    with torch.no_grad():
        term = advantages.detach().double() * beta_dpo * (err.detach().double() - ref_err.detach().double())
        ids = group_ids.to(term.device).long()
        sums = torch.zeros(2, num_groups, dtype=torch.float64, device=term.device)
        sums[0].scatter_add_(0, ids, term)
        sums[1].scatter_add_(0, ids, torch.ones_like(term))
        sums = reduce(sums)
        scores = sums[0] / sums[1].clamp_min(1.0)
        return torch.sigmoid(scores)[ids], scores


def dgpo_loss(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    advantages: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    beta_dpo: float = DGPO_BETA_DPO,
    old_err: torch.Tensor | None = None,
    clip_range: float = DGPO_CLIP_RANGE,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    clip_kl: bool = False,
    adv_clip_max: float = DGPO_ADV_CLIP_MAX,
    all_reduce: AllReduce | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DGPO loss of one trained timestep; returns (scalar loss, detached statistics).

    Inputs are per-sample (B,): ``err = mean_dims((eps - x0 - v)^2)`` of the trained policy (with gradients),
    ``ref_err`` of the score's reference (the frozen base, or the EMA policy), ``old_err`` of the sampling policy
    (None: no clipping), ``kl = mean_dims((v - v_ref)^2)`` with gradients (None: no KL term). Every member of a group
    must have been noised with the SAME eps and t (:func:`group_shared_noise`)::

        A = clip(A, -adv_clip_max, adv_clip_max)
        w_i = sigmoid(s_G(i))                                      (dgpo_group_weights, no gradient)
        r_i = exp(old_err_i - err_i);  clipped_i = r_i > 1 + c if A_i > 0 else r_i < 1 - c      (no gradient)
        err'_i = err_i, detached where clipped_i
        loss = mean(w_i A_i err'_i) + kl_coef * mean(kl'_i)        (kl' detached where clipped when clip_kl)

    The mean is over this process's samples (DDP averages the gradients). Statistics: ``policy_loss``, ``kl``,
    ``group_weight_mean``, ``group_score_mean|min|max`` (over the groups present), ``err_mean``, and the ratio
    statistics of :func:`align.losses.grpo.grpo_clip_loss` with ``clip_fraction`` the clipped fraction.
    """
    if beta_dpo <= 0 or clip_range < 0 or kl_coef < 0 or adv_clip_max <= 0:
        raise ValueError("dgpo_loss needs beta_dpo > 0, clip_range >= 0, kl_coef >= 0 and adv_clip_max > 0")
    n = err.shape[0]
    for name, x in (("ref_err", ref_err), ("advantages", advantages), ("group_ids", group_ids), ("old_err", old_err),
                    ("kl", kl)):
        if x is not None and x.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) like err, got {tuple(x.shape)}")
    if kl is None and kl_coef:
        raise ValueError("dgpo_loss needs kl when kl_coef > 0")
    adv = advantages.detach().to(err.dtype).clamp(-adv_clip_max, adv_clip_max)
    weights, scores = dgpo_group_weights(err, ref_err, adv, group_ids, num_groups, beta_dpo, all_reduce)
    with torch.no_grad():
        if old_err is None:
            ratio = torch.ones_like(err.detach())
        else:
            ratio = torch.exp(old_err.detach() - err.detach())
        clipped = torch.where(adv > 0, ratio > 1.0 + clip_range, ratio < 1.0 - clip_range)
    err_used = torch.where(clipped, err.detach(), err)
    policy = (weights.to(err.dtype) * adv * err_used).mean()
    loss = policy
    stats = ratio_stats(ratio, clipped)
    if kl is not None:
        kl_used = torch.where(clipped, kl.detach(), kl) if clip_kl else kl
        kl_mean = kl_used.mean()
        if kl_coef:
            loss = loss + kl_coef * kl_mean
        stats["kl"] = float(kl_mean.detach())
    present = torch.zeros(num_groups, dtype=torch.bool, device=scores.device)
    present[group_ids.to(scores.device).long()] = True
    stats.update({
        "policy_loss": float(policy.detach()),
        "err_mean": float(err.detach().mean()),
        "group_weight_mean": float(weights.mean()),
        "group_score_mean": float(scores[present].mean()),
        "group_score_min": float(scores[present].min()),
        "group_score_max": float(scores[present].max()),
    })
    return loss, stats
