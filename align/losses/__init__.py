"""Pure loss functions (no model, no trainer): flow matching, Flow-DPO, Flow-GRPO and its stabilisers, KL to the
reference, the forward-process online objectives (DiffusionNFT, AWM, DGPO) and Diffusion-KTO."""

from .awm import awm_log_prob, awm_loss, awm_timestep_indices
from .dgpo import dgpo_group_weights, dgpo_loss, group_shared_noise
from .dpo import DPO_LOSS_TYPES, flow_dpo_loss
from .flow_matching import flow_matching_loss, make_noisy, sample_sigmas, velocity_error
from .grpo import (
    KL_FORMS,
    TRUST_REGION_FORMS,
    dppo_loss,
    gaussian_kl,
    group_advantages,
    grpo_clip_loss,
    grpo_guard_loss,
    num_train_timesteps,
    rewards_tensor,
    trust_region_kl,
)
from .kto import kto_implicit_reward, kto_loss
from .nft import delayed_linear_decay, ema_update_, linear_decay, nft_implicit_velocities, nft_loss, nft_optimality

__all__ = [
    "flow_matching_loss", "make_noisy", "sample_sigmas", "velocity_error",
    "DPO_LOSS_TYPES", "flow_dpo_loss",
    "KL_FORMS", "gaussian_kl", "group_advantages", "grpo_clip_loss", "num_train_timesteps", "rewards_tensor",
    "grpo_guard_loss", "dppo_loss", "TRUST_REGION_FORMS", "trust_region_kl",
    "nft_loss", "nft_implicit_velocities", "nft_optimality", "linear_decay", "delayed_linear_decay", "ema_update_",
    "awm_log_prob", "awm_loss", "awm_timestep_indices",
    "dgpo_loss", "dgpo_group_weights", "group_shared_noise",
    "kto_loss", "kto_implicit_reward",
]
