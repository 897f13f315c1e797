"""AWM, advantage-weighted matching (Xue et al., arXiv 2509.25050), as pure functions: the generalised-Huber
weighted flow-matching "log-prob", the PPO-shaped on-policy loss with the reference KL and the optional EMA-KL, and
the stratified choice of trained timesteps. Formulas, conventions and why: docs/math.md ("AWM").

The old policy's EMA decay for the EMA-KL adapter is ``linear_decay(step, AWM_EMA_DECAY_RATE, AWM_EMA_DECAY_CAP)``
and its update ``ema_update_`` (both in ``align.losses.nft``).
"""

from __future__ import annotations

import torch

from .grpo import clipped_surrogate, num_train_timesteps

AWM_WEIGHTINGS = ("ghuber", "uniform")
AWM_GHUBER_POWER = 0.25
AWM_GHUBER_EPS = 1e-10
AWM_ADV_CLIP_MAX = 5.0        # advantages clipped to +-5 ...
AWM_ADVANTAGE_MAX = 1.0       # ... then rescaled onto +-1 (divided by 5)
AWM_CLIP_RANGE = 1.0          # the published configs' PPO clip range (on-policy the ratio is 1 anyway)
AWM_KL_COEF_OCR = 0.003       # beta for mean((v - v_ref)^2): OCR
AWM_KL_COEF_GENEVAL = 0.001   # GenEval / PickScore
AWM_EMA_KL_COEF = 1.0         # weight of mean((v - v_ema)^2)
AWM_EMA_DECAY_RATE, AWM_EMA_DECAY_CAP = 0.001, 0.3
AWM_NUM_TRAIN_TIMESTEPS = 6   # trained timesteps per micro-batch (shared by its samples)
AWM_TIMESTEP_FRACTION = 0.9   # of a 14-step sampler grid


def awm_log_prob(
    v: torch.Tensor,
    noise: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    weighting: str = "ghuber",
    power: float = AWM_GHUBER_POWER,
    eps: float = AWM_GHUBER_EPS,
) -> torch.Tensor:
    """Per-sample "log-prob" (B,), float64: the negative flow-matching error on ``x_t = (1 - t) x0 + t noise``.

    ``e = mean_dims((v - (noise - x0))^2)`` (float64);
    ``ghuber``: ``-(((e + eps)^p - eps^p) * t / p)`` (generalised Huber, p = 0.25: large errors count less, so a few
    badly denoised samples do not dominate the advantage-weighted gradient); ``uniform``: ``-e``.
    Only ``v`` carries gradients; ``t`` (B,) is the noise level sigma of each sample.
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"AWM weighting must be one of {AWM_WEIGHTINGS}, got {weighting!r}")
    if v.shape != noise.shape or v.shape != x0.shape:
        raise ValueError(f"v, noise and x0 must have the same shape, got {tuple(v.shape)}, {tuple(noise.shape)}, {tuple(x0.shape)}")
    if t.shape != (v.shape[0],):
        raise ValueError(f"t must have shape ({v.shape[0]},), got {tuple(t.shape)}")
    target = noise.detach().double() - x0.detach().double()
    err = ((v.double() - target) ** 2).mean(dim=tuple(range(1, v.dim())))
    if weighting == "uniform":
        return -err
    if power <= 0:
        raise ValueError(f"the generalised-Huber power must be > 0, got {power}")
    floor = torch.tensor(eps, dtype=torch.float64, device=err.device) ** power
    return -(((err + eps) ** power - floor) * t.detach().double() / power)


def awm_loss(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    old_log_prob: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    v_ref: torch.Tensor | None = None,
    v_ema: torch.Tensor | None = None,
    adv_clip_max: float = AWM_ADV_CLIP_MAX,
    advantage_max: float = AWM_ADVANTAGE_MAX,
    clip_range: float = AWM_CLIP_RANGE,
    kl_coef: float = 0.0,
    ema_kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """AWM loss for a micro-batch of (timestep, sample) rows; returns (scalar loss, detached statistics).

    ``log_prob`` (N,) from :func:`awm_log_prob` with gradients; ``advantages`` (N,) each row's sample advantage;
    ``old_log_prob`` (N,) the sampling policy's, or None on-policy (then ``old = log_prob.detach()`` and the ratio
    is exactly 1)::

        A' = clip(A, -adv_clip_max, adv_clip_max) / adv_clip_max * advantage_max
        r  = exp(log_prob - old_log_prob)
        policy = mean(max(-A' r, -A' clip(r, 1 - clip_range, 1 + clip_range)))
        loss = policy + kl_coef * mean((v - v_ref)^2) + ema_kl_coef * mean((v - v_ema)^2)

    On-policy the gradient is ``-A' grad(log_prob) / N``: the flow-matching loss weighted by the advantage. ``v``
    (with gradients), ``v_ref`` and ``v_ema`` (no gradient) are (N, ...) and needed only for a nonzero coefficient.
    Statistics: ``policy_loss``, ``kl``, ``ema_kl`` (when given), ``log_prob_mean`` and the ratio statistics of
    :func:`align.losses.grpo.grpo_clip_loss` (``ratio_mean|min|max``, ``clip_fraction``).
    """
    if adv_clip_max <= 0 or advantage_max <= 0:
        raise ValueError(f"adv_clip_max and advantage_max must be > 0, got {adv_clip_max}, {advantage_max}")
    if kl_coef < 0 or ema_kl_coef < 0:
        raise ValueError(f"kl_coef and ema_kl_coef must be >= 0, got {kl_coef}, {ema_kl_coef}")
    if advantages.shape != log_prob.shape or (old_log_prob is not None and old_log_prob.shape != log_prob.shape):
        raise ValueError("log_prob, old_log_prob and advantages must have the same shape (N,)")
    old = log_prob.detach() if old_log_prob is None else old_log_prob.detach()
    adv = advantages.detach().double().clamp(-adv_clip_max, adv_clip_max) / adv_clip_max * advantage_max
    ratio = torch.exp(log_prob.double() - old.double())
    per_row, stats = clipped_surrogate(ratio, adv, clip_range)
    policy = per_row.mean()
    loss = policy
    for name, coef, other in (("kl", kl_coef, v_ref), ("ema_kl", ema_kl_coef, v_ema)):
        if other is None:
            if coef:
                raise ValueError(f"awm_loss needs v and v_{'ref' if name == 'kl' else 'ema'} when {name}_coef > 0")
            continue
        if v is None or v.shape != other.shape:
            raise ValueError(f"awm_loss needs v with the shape of v_{'ref' if name == 'kl' else 'ema'}")
        term = ((v.double() - other.detach().double()) ** 2).mean(dim=tuple(range(1, v.dim()))).mean()
        if coef:
            loss = loss + coef * term
        stats[name] = float(term.detach())
    stats["policy_loss"] = float(policy.detach())
    stats["log_prob_mean"] = float(log_prob.detach().double().mean())
    return loss, stats


def awm_timestep_indices(
    num_steps: int,
    num_timesteps: int = AWM_NUM_TRAIN_TIMESTEPS,
    timestep_fraction: float = AWM_TIMESTEP_FRACTION,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stratified indices (num_timesteps,) into a ``num_steps`` sampler grid, one per stratum, shared by a
    micro-batch (the published "discrete without the first step" scheme).

    The trainable steps ``1 .. int(num_steps * timestep_fraction) - 1`` (step 0, pure noise, is left out) are cut
    into ``num_timesteps`` contiguous strata at ``floor(linspace(1, K, n + 1))`` and one index is drawn uniformly in
    each, so every noise range is trained in every micro-batch. Draws use ``generator`` on the CPU (a resumed run
    repeats them). Raises when the grid has fewer trainable steps than ``num_timesteps`` (empty strata).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    last = num_train_timesteps(num_steps, timestep_fraction)
    if last - 1 < num_timesteps:
        raise ValueError(f"{num_steps} sampler steps with timestep_fraction {timestep_fraction} leave {max(last - 1, 0)} "
                         f"trainable steps, fewer than the {num_timesteps} AWM timesteps asked for")
    bounds = torch.linspace(1, last, num_timesteps + 1, dtype=torch.float64).floor().long()
    lower, upper = bounds[:-1], bounds[1:]
    u = torch.rand(num_timesteps, generator=generator, dtype=torch.float64)
    return lower + (u * (upper - lower)).long()
