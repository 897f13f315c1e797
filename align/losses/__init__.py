"""Pure loss functions (no model, no trainer): flow matching, Flow-DPO, Flow-GRPO, KL to the reference."""

from .dpo import DPO_LOSS_TYPES, flow_dpo_loss
from .flow_matching import flow_matching_loss, make_noisy, sample_sigmas, velocity_error
from .grpo import KL_FORMS, gaussian_kl, group_advantages, grpo_clip_loss, num_train_timesteps, rewards_tensor

__all__ = [
    "flow_matching_loss", "make_noisy", "sample_sigmas", "velocity_error",
    "DPO_LOSS_TYPES", "flow_dpo_loss",
    "KL_FORMS", "gaussian_kl", "group_advantages", "grpo_clip_loss", "num_train_timesteps", "rewards_tensor",
]
