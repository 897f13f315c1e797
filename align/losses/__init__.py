"""Pure loss functions (no model, no trainer): flow matching, Flow-DPO, Flow-GRPO and its stabilisers, KL to the
reference, the forward-process online objectives (DiffusionNFT, AWM, DGPO) and Diffusion-KTO.

Names load lazily (PEP 562): the configs read constants of these modules (``DPO_LOSS_TYPES``, ``KL_FORMS``, ...),
and ``qwen-image-align`` imports the configs to check the options before it launches; only ``flow_matching``
imports diffusers (with its quantisation back-ends, bitsandbytes and torchao: seconds), and only training needs it.
"""

from __future__ import annotations

from qwen_image.lazy import lazy_exports

_MODULE_NAMES = {
    "flow_matching": ("flow_matching_loss", "make_noisy", "sample_sigmas", "velocity_error"),
    "dpo": ("DPO_LOSS_TYPES", "flow_dpo_loss"),
    "grpo": ("KL_FORMS", "gaussian_kl", "group_advantages", "grpo_clip_loss", "num_train_timesteps", "rewards_tensor",
             "grpo_guard_loss", "dppo_loss", "TRUST_REGION_FORMS", "trust_region_kl"),
    "nft": ("nft_loss", "nft_implicit_velocities", "nft_optimality", "linear_decay", "delayed_linear_decay",
            "ema_update_"),
    "awm": ("awm_log_prob", "awm_loss", "awm_timestep_indices"),
    "dgpo": ("dgpo_loss", "dgpo_group_weights", "group_shared_noise"),
    "kto": ("kto_loss", "kto_implicit_reward"),
}
__getattr__, __dir__, __all__ = lazy_exports(
    __name__, {name: module for module, names in _MODULE_NAMES.items() for name in names}, submodules=_MODULE_NAMES)
