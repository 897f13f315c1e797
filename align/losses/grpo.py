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
    ratio = torch.exp(log_prob - old_log_prob.detach())
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        r = ratio.detach()
        metrics = {
            "ratio_mean": float(r.mean()),
            "ratio_min": float(r.min()),
            "ratio_max": float(r.max()),
            "clip_fraction": float(((r - 1.0).abs() > epsilon).float().mean()),
        }
    return loss, metrics


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
