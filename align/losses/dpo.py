"""Flow-DPO (Diffusion-DPO on velocities, the Qwen-Image report's form) with TRL's ``loss_type`` variants
(docs/math.md, "Flow-DPO").

Inputs are per-sample mean-over-dims squared velocity errors (``velocity_error``) of the policy and of the frozen
reference on the winner (chosen) and loser (rejected) of each pair, computed with the SAME noise and sigma for both.

Following TRL's DPOTrainer, everything is written in terms of an implicit per-image log-ratio
``log_ratio = -(e_policy - e_ref) / 2`` (the Gaussian path log-likelihood ratio up to a constant folded into beta;
the 1/2 is the Qwen-Image report's ``beta/2``) and ``delta = log_ratio_chosen - log_ratio_rejected``:

- ``sigmoid``: ``-log sigmoid(beta * delta)`` = ``-log sigmoid(-(beta/2) * [(e_w - e_w_ref) - (e_l - e_l_ref)])``
- ``hinge``:   ``relu(1 - beta * delta)`` (SLiC), TRL's form
- ``ipo``:     ``(delta - 1/(2 beta))^2`` (IPO eq. 17, beta = tau); TRL divides by the token count, our errors are
  already means over latent dims, which plays the same role (beta comparable across resolutions).

Scale: errors are MEANS over dims, so beta is much larger than in LLM DPO; flow_grpo's Flow-DPO uses 100 on the same
quantity (Diffusion-DPO's 2500-5000 were on SD's eps-MSE with the timestep weight folded in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def flow_dpo_loss(
    policy_err_chosen: torch.Tensor,
    policy_err_rejected: torch.Tensor,
    ref_err_chosen: torch.Tensor,
    ref_err_rejected: torch.Tensor,
    beta: float = 100.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (mean loss, metrics) for per-pair errors of shape (B,).

    Metrics (detached, TRL's names): ``rewards/chosen``, ``rewards/rejected`` (beta * log_ratio), ``rewards/margins``,
    ``rewards/accuracies`` (implicit accuracy: fraction of pairs where the policy moved towards the winner more than
    towards the loser, relative to the reference), and the four mean errors ``error/{policy,ref}_{chosen,rejected}``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {t.shape for t in (policy_err_chosen, policy_err_rejected, ref_err_chosen, ref_err_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"the four error tensors must have the same shape, got {sorted(map(tuple, shapes))}")
    # Reference errors never carry gradient (a stray grad through the reference would train it).
    ref_err_chosen, ref_err_rejected = ref_err_chosen.detach().float(), ref_err_rejected.detach().float()
    log_ratio_chosen = -(policy_err_chosen.float() - ref_err_chosen) / 2
    log_ratio_rejected = -(policy_err_rejected.float() - ref_err_rejected) / 2
    delta = log_ratio_chosen - log_ratio_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        losses = (delta - 1 / (2 * beta)) ** 2
    chosen_rewards = (beta * log_ratio_chosen).detach()
    rejected_rewards = (beta * log_ratio_rejected).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "error/policy_chosen": policy_err_chosen.detach().float().mean(),
        "error/policy_rejected": policy_err_rejected.detach().float().mean(),
        "error/ref_chosen": ref_err_chosen.mean(),
        "error/ref_rejected": ref_err_rejected.mean(),
    }
    return losses.mean(), metrics
