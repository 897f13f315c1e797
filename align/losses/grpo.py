"""Flow-GRPO objective pieces as pure functions: group advantages, the clipped ratio loss, and the closed-form
KL between two SDE-step Gaussians that share their std. Formulas, conventions and why: docs/math.md ("Flow-GRPO").
"""

from __future__ import annotations

from typing import Sequence

import torch

KL_FORMS = ("flow_grpo", "exact")


def rewards_tensor(rewards: Sequence[float | None] | torch.Tensor) -> torch.Tensor:
    """Rewards as a float tensor with NaN for None (not applicable), as TRL does."""
    if torch.is_tensor(rewards):
        return rewards.to(torch.float32)
    return torch.tensor([float("nan") if r is None else float(r) for r in rewards], dtype=torch.float32)


def group_advantages(
    rewards: Sequence[float | None] | torch.Tensor,
    group_size: int,
    scale_rewards: bool | str = True,
    clip: float | None = 5.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Per-group advantages ``(r - mean_g) / (std_g + eps)``, clipped to ``[-clip, clip]``.

    ``rewards`` is ordered group by group (``group_size`` consecutive samples share a prompt, as RepeatSampler
    yields them). ``scale_rewards``: True / "group" divides by the group std, "batch" by the std over all
    rewards (flow_grpo's ``global_std``), False / "none" only centres. The std is the population std (ddof 0)
    as in flow_grpo's stat tracker (TRL's ``nanstd`` uses ddof 1; with groups of 16-24 the difference is small,
    but published clip ranges were tuned with ddof 0). None / NaN rewards are left out of the statistics and
    get advantage 0, so they add nothing to the policy gradient.
    """
    r = rewards_tensor(rewards)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards cannot be split into groups of {group_size}.")
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if mode not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be True/False or 'group'/'batch'/'none', got {scale_rewards!r}")
    g = r.view(-1, group_size)
    valid = ~torch.isnan(g)
    count = valid.sum(dim=1, keepdim=True).clamp_min(1)
    filled = torch.where(valid, g, torch.zeros_like(g))
    mean = filled.sum(dim=1, keepdim=True) / count
    centred = torch.where(valid, g - mean, torch.zeros_like(g))
    if mode == "group":
        std = torch.sqrt((centred**2).sum(dim=1, keepdim=True) / count)
    elif mode == "batch":
        flat = r[~torch.isnan(r)]
        std = flat.std(unbiased=False) if flat.numel() > 1 else torch.tensor(0.0)
    else:
        std = None
    adv = centred if std is None else centred / (std + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.reshape(-1)


def grpo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate: ``mean(max(-A r, -A clip(r, 1-eps, 1+eps)))`` with ``r = exp(lp - lp_old)``.

    All inputs are (B,). Returns the loss and detached statistics: ratio mean/min/max and the fraction of
    samples whose ratio lies outside the clip range (where the clipped branch stops the gradient).
    """
    per_sample, metrics = clipped_surrogate(torch.exp(log_prob - old_log_prob.detach()), advantages, epsilon)
    return per_sample.mean(), metrics


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sample PPO surrogate ``max(-A r, -A clip(r, 1-eps, 1+eps))`` and the ratio statistics every policy loss
    reports (mean/min/max, fraction outside the clip range)."""
    adv = advantages.detach().to(ratio.dtype)
    per_sample = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon))
    r = ratio.detach()
    return per_sample, ratio_stats(r, (r - 1.0).abs() > epsilon)


def ratio_stats(ratio: torch.Tensor, clipped: torch.Tensor) -> dict[str, float]:
    """The statistics every policy loss reports: ratio mean / min / max and ``clip_fraction``, the fraction of
    samples whose gradient the clip (or a trust-region mask) stops (``clipped``: a boolean (B,))."""
    r = ratio.detach()
    return {
        "ratio_mean": float(r.mean()),
        "ratio_min": float(r.min()),
        "ratio_max": float(r.max()),
        "clip_fraction": float(clipped.float().mean()),
    }


def gaussian_kl(
    mean: torch.Tensor,
    mean_ref: torch.Tensor,
    std_dev_t: torch.Tensor | float,
    dt: float,
    form: str = "flow_grpo",
) -> torch.Tensor:
    """KL(N(mean, s^2) || N(mean_ref, s^2)) for one SDE step, per sample (B,). Both Gaussians share the std.

    ``std_dev_t`` is sigma_t = a sqrt(s/(1-s)) (the step's std per element is sigma_t sqrt(|dt|)).
    ``form="flow_grpo"``: ``mean_dims((mean - mean_ref)^2) / (2 sigma_t^2)`` - flow_grpo's code (no 1/|dt|, mean
    over dims); its published beta values (0.04 OCR / GenEval, 0.01 PickScore) assume this form.
    ``form="exact"``: ``sum_dims((mean - mean_ref)^2) / (2 sigma_t^2 |dt|)``, the true KL of the step.
    """
    if form not in KL_FORMS:
        raise ValueError(f"kl_form must be one of {KL_FORMS}, got {form!r}")
    diff2 = (mean.float() - mean_ref.float()) ** 2
    dims = tuple(range(1, diff2.dim()))
    var = torch.as_tensor(std_dev_t, dtype=torch.float32, device=diff2.device) ** 2
    if form == "flow_grpo":
        return diff2.mean(dim=dims) / (2 * var)
    if dt == 0:
        raise ValueError("exact KL needs a step with dt != 0")
    return diff2.sum(dim=dims) / (2 * var * abs(float(dt)))


def num_train_timesteps(num_sde_steps: int, timestep_fraction: float) -> int:
    """How many of the SDE steps are trained: ``int(T * fraction)`` as flow_grpo does, at least 1."""
    if not 0 < timestep_fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
    return max(1, int(num_sde_steps * timestep_fraction + 1e-9)) if num_sde_steps else 0


def sde_window_for(
    num_inference_steps: int,
    window_size: int | None,
    window_range: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[int, int] | None:
    """Flow-GRPO-Fast: a window of ``window_size`` SDE steps starting at a random step in ``window_range``
    ([lo, hi), default the first half of the trajectory); ODE elsewhere. None / 0 = SDE on every step."""
    if not window_size:
        return None
    if window_size > num_inference_steps:
        raise ValueError(f"sde_window_size {window_size} exceeds num_inference_steps {num_inference_steps}.")
    lo, hi = window_range if window_range else (0, max(1, num_inference_steps // 2))
    hi = min(hi, num_inference_steps - window_size + 1)
    if not 0 <= lo < hi:
        raise ValueError(f"sde_window_range {list(window_range or [])} leaves no start for a window of {window_size} steps.")
    start = int(torch.randint(lo, hi, (1,), generator=generator))
    return start, start + window_size


# ---------------------------------------------------------------- stabilisers (drop-in for grpo_clip_loss)
POLICY_LOSSES = ("clip", "guard", "dppo")


def _mean_over_dims(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def _step_scale(std_dev_t: torch.Tensor | float, dt: float) -> torch.Tensor:
    # The per-element std of one SDE step, sigma_t sqrt(|dt|), as a scalar (sigma_t is the same for the batch).
    if dt == 0:
        raise ValueError("a stabiliser needs an SDE step with dt != 0")
    return torch.as_tensor(std_dev_t, dtype=torch.float32).mean() * abs(float(dt)) ** 0.5


def grpo_guard_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std_dev_t: torch.Tensor | float,
    dt: float,
    reweight: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO-Guard (Wang et al. 2025, arXiv 2510.22319): the clipped loss on a *normalised* ratio, one SDE step.

    Why: with a Gaussian step, ``log r = lp - lp_old`` has mean ``-b`` and a spread that grows as the step's std
    ``s = sigma_t sqrt(|dt|)`` shrinks, so the raw ratio sits below 1 (worst at low-noise steps) and positive-advantage
    samples rarely reach the ``1 + eps`` clip: the clip stops guarding against over-confident updates. RatioNorm
    removes the shift and puts every step on one scale::

        b     = mean_dims((mean - old_mean)^2) / (2 s^2)          # -E[log r] per element
        r_hat = exp((lp - lp_old + b) * s)
        L     = mean(max(-A r_hat, -A clip(r_hat, 1 - eps, 1 + eps))) * w,   w = 1/|dt| if reweight else 1

    ``w = 1/|dt|`` is the paper's gradient reweighting across noise levels (verl-omni's GRPOGuardLoss does the
    same). ``b`` keeps its gradient (it is a function of the current mean). Inputs: ``log_prob``/``old_log_prob``/
    ``advantages`` (B,) as for :func:`grpo_clip_loss`; ``mean`` the current policy's step mean (B, ...) with
    gradients, ``old_mean`` the rollout policy's (stored at sampling), ``std_dev_t`` sigma_t = a sqrt(s/(1-s)),
    ``dt`` the step's sigma_next - sigma. Same metric keys as :func:`grpo_clip_loss` (on ``r_hat``) plus
    ``ratio_bias_mean`` (b). With ``mean == old_mean`` and equal log-probs ``r_hat`` is exactly 1.
    """
    scale = _step_scale(std_dev_t, dt).to(log_prob.device)
    bias = _mean_over_dims((mean.float() - old_mean.detach().float()) ** 2) / (2 * scale**2)
    ratio = torch.exp((log_prob - old_log_prob.detach() + bias) * scale)
    per_sample, metrics = clipped_surrogate(ratio, advantages, epsilon)
    weight = 1.0 / abs(float(dt)) if reweight else 1.0
    metrics["ratio_bias_mean"] = float(bias.detach().mean())
    return per_sample.mean() * weight, metrics


TRUST_REGION_FORMS = ("paper", "flow_grpo", "exact")


def trust_region_kl(
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std_dev_t: torch.Tensor | float,
    dt: float,
    form: str = "paper",
) -> torch.Tensor:
    """Flow-DPPO's per-sample divergence between the old and the current step Gaussians (B,), no gradient.

    ``paper``: ``D = mean_dims((mean - old_mean)^2) / (2 (sigma_t sqrt|dt|)^2)``, the paper's D_t (per element, with
    the step's real std ``sigma_t sqrt|dt|``); ``flow_grpo``: the same without ``1/|dt|`` (|dt| times smaller, the
    form this project used before; the paper's eps_D is then 10-50x looser); ``exact``: summed over elements,
    ``sum_dims(...) / (2 sigma_t^2 |dt|)``.
    """
    if form not in TRUST_REGION_FORMS:
        raise ValueError(f"trust_region_form must be one of {TRUST_REGION_FORMS}, got {form!r}")
    with torch.no_grad():
        if form == "exact":
            return gaussian_kl(mean.detach(), old_mean.detach(), std_dev_t, dt, "exact")
        per_element = gaussian_kl(mean.detach(), old_mean.detach(), std_dev_t, dt, "flow_grpo")
        if form == "flow_grpo":
            return per_element
        if dt == 0:
            raise ValueError("the trust region needs an SDE step with dt != 0")
        return per_element / abs(float(dt))


def dppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_kl: float,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std_dev_t: torch.Tensor | float,
    dt: float,
    kl_form: str | None = None,
    trust_region_form: str = "paper",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-DPPO (Ping et al. 2026, arXiv 2606.11025): a KL trust region per SDE step instead of ratio clipping.

    Why: the ratio of one sampled transition is a noisy estimate of how far the policy moved; the step policies
    are Gaussians with a shared std, so the divergence itself is exact and cheap::

        D = trust_region_kl(mean, old_mean, sigma_t, dt, trust_region_form)
            # paper: mean_dims((mean - old_mean)^2) / (2 (sigma_t sqrt|dt|)^2)
        r = exp(lp - lp_old)
        M = 0 where D >= eps_D and the update moves further out (A > 0 and r > 1, or A < 0 and r < 1), else 1
        L = mean(-A r M)

    The mask ``M`` (no gradient) is asymmetric like PPO's clip: a sample past the trust region still gets the
    gradient that pulls it back (verl-omni's rule, ``>=`` included). ``trust_region_form`` is independent of the
    reference KL's ``kl_form``: ``"paper"`` (default) reads eps_D ~ 1e-5 at the paper's scale; ``"flow_grpo"`` is the
    earlier behaviour (no ``1/|dt|``, |dt| times smaller, so the same eps_D is looser); ``"exact"`` sums over elements.
    ``kl_form`` is accepted so callers written before the split keep running; it no longer changes the trust region.
    Same inputs as :func:`grpo_guard_loss` with ``epsilon_kl`` in place of the clip range; the metric keys of
    :func:`grpo_clip_loss` (``clip_fraction`` = fraction masked) plus ``trust_kl_mean`` / ``trust_kl_max``.
    On-policy (``mean == old_mean``) nothing is masked and the loss is the plain policy gradient ``mean(-A r)``.
    """
    if kl_form is not None and kl_form not in KL_FORMS:
        raise ValueError(f"kl_form must be one of {KL_FORMS}, got {kl_form!r}")
    ratio = torch.exp(log_prob - old_log_prob.detach())
    adv = advantages.detach().to(ratio.dtype)
    with torch.no_grad():
        kl = trust_region_kl(mean, old_mean, std_dev_t, dt, trust_region_form).to(ratio.device)
        r = ratio.detach()
        moving_out = ((adv > 0) & (r > 1)) | ((adv < 0) & (r < 1))
        masked = (kl >= epsilon_kl) & moving_out
        keep = (~masked).to(ratio.dtype)
    loss = (-adv * ratio * keep).mean()
    metrics = {**ratio_stats(r, masked), "trust_kl_mean": float(kl.mean()), "trust_kl_max": float(kl.max())}
    return loss, metrics
