"""Diffusion-KTO (Li et al., arXiv 2404.04465) on velocities: learn from per-image desirable / undesirable labels
instead of pairs. Formulas, conventions and why: docs/math.md ("Diffusion-KTO").

Inputs are per-sample mean-over-dims squared velocity errors (``velocity_error``) of the policy and of the frozen
reference at the same noise and sigma, as for Flow-DPO. The definition follows the official implementation's
default (``--loss kto --halo sigmoid``, batch offset):

    g_i = -(e_policy_i - e_ref_i)                        implicit reward (0 when policy == reference)
    z   = max(0, mean_batch(g)), no gradient              reference point (the KL estimate); mean over processes too
    h_i = sigmoid(s_i * beta * (g_i - z)),   s_i = +1 desirable, -1 undesirable
    L   = mean_i(w_i (1 - h_i)),             w_i = desirable_weight or undesirable_weight
"""

from __future__ import annotations

from typing import Callable

import torch

KTO_BETA = 1000.0            # the official default (on SD's eps errors; the scale of beta depends on the error's)
KTO_DESIRABLE_WEIGHT = 1.0   # lambda_D
KTO_UNDESIRABLE_WEIGHT = 1.0  # lambda_U


def kto_implicit_reward(policy_err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor:
    """``g = -(policy_err - ref_err)`` (B,) in fp32 at least: positive where the policy denoises the image better than
    the reference. Exactly 0 when policy and reference give the same error, whatever the input dtype."""
    dtype = torch.promote_types(policy_err.dtype, torch.float32)
    return -(policy_err.to(dtype) - ref_err.detach().to(dtype))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # NaN when the class is absent from the batch: an honest "no value", not a misleading 0.
    count = mask.sum()
    return (x * mask).sum() / count if count else torch.full((), float("nan"), dtype=x.dtype, device=x.device)


def kto_loss(
    policy_err: torch.Tensor,
    ref_err: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = KTO_BETA,
    desirable_weight: float = KTO_DESIRABLE_WEIGHT,
    undesirable_weight: float = KTO_UNDESIRABLE_WEIGHT,
    kl_offset: torch.Tensor | float | None = None,
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (mean loss, metrics) for per-image errors (B,) and a boolean ``desirable`` (B,) label.

    ``kl_offset``: None estimates the reference point from the batch, ``max(0, mean(g))`` detached, averaged over
    processes with ``all_reduce_mean`` (a MEAN over processes returning the result; default this process only);
    a given value (e.g. from mismatched prompt / image pairs) is used as is, detached. Only ``policy_err`` gets
    gradients. Metrics (detached tensors, TRL's KTO names where they exist): ``rewards/desirable`` and
    ``rewards/undesirable`` (mean ``beta * g`` per class, NaN if the class is absent), ``rewards/margins``,
    ``rewards/accuracies`` (fraction with ``s * (g - z) > 0``: the implicit accuracy), ``kl`` (z),
    ``count/desirable|undesirable``, and the mean errors ``error/policy`` and ``error/ref``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"KTO weights must be >= 0, got {desirable_weight}, {undesirable_weight}")
    n = policy_err.shape[0]
    if policy_err.shape != (n,) or ref_err.shape != (n,) or desirable.shape != (n,):
        raise ValueError(f"policy_err, ref_err and desirable must all have shape (B,), got {tuple(policy_err.shape)}, "
                         f"{tuple(ref_err.shape)}, {tuple(desirable.shape)}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    g = kto_implicit_reward(policy_err, ref_err)
    with torch.no_grad():
        if kl_offset is None:
            z = g.detach().mean()
            if all_reduce_mean is not None:
                z = all_reduce_mean(z)
            z = z.clamp_min(0)
        else:
            z = torch.as_tensor(kl_offset, dtype=g.dtype, device=g.device).detach()
    sign = desirable.to(g.dtype) * 2 - 1
    h = torch.sigmoid(sign * beta * (g - z))
    weight = torch.where(desirable, torch.full_like(g, desirable_weight), torch.full_like(g, undesirable_weight))
    losses = weight * (1 - h)
    with torch.no_grad():
        rewards = beta * g.detach()
        undesirable = ~desirable
        reward_d, reward_u = _masked_mean(rewards, desirable), _masked_mean(rewards, undesirable)
        metrics = {
            "rewards/desirable": reward_d,
            "rewards/undesirable": reward_u,
            "rewards/margins": reward_d - reward_u,
            "rewards/accuracies": (sign * (g.detach() - z) > 0).to(g.dtype).mean(),
            "kl": z,
            "count/desirable": desirable.sum().to(g.dtype),
            "count/undesirable": undesirable.sum().to(g.dtype),
            "error/policy": policy_err.detach().to(g.dtype).mean(),
            "error/ref": ref_err.detach().to(g.dtype).mean(),
        }
    return losses.mean(), metrics
