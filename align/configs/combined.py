"""Options of the combined objective ``L = w_dpo DPO + w_online L_online + w_kto KTO + beta_kl KL (+ w_sft FM)``:
the Flow-DPO fields, the online term's (``online: grpo | nft | awm | dgpo`` and each method's own fields) and its
prompt set, and the KTO term on a rated dataset (``w_kto``, ``kto_dataset_name`` and the rating labels of
:mod:`align.configs.kto`).

``w_grpo`` is the older name of ``w_online``: a recipe with ``w_grpo > 0`` and no ``online`` runs Flow-GRPO as
before. After parsing, ``w_grpo`` and ``w_online`` hold the same value (the online term's weight) and
``online_method`` the method, or None when the online term is off."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from qwen_image.errors import UserError

from ..losses.kto import KTO_BETA
from .dpo import DPOConfig
from .forward import ONLINE_METHODS, AWMArguments, DGPOArguments, NFTArguments
from .grpo import GRPOArguments
from .kto import RatingLabelArguments

# Rollout CFG when true_cfg_scale is left unset: Flow-GRPO's SDE rollouts as before; the forward-process methods
# train on CFG-free samples.
DEFAULT_ROLLOUT_CFG = {"grpo": 4.0, "nft": 1.0, "awm": 1.0, "dgpo": 1.0}


@dataclass
class DPOGRPOConfig(GRPOArguments, NFTArguments, AWMArguments, DGPOArguments, RatingLabelArguments, DPOConfig):
    """Flow-DPO settings plus the online term's and the KTO term's; ``dataset_name`` holds the pairs,
    ``grpo_dataset_name`` the prompts, ``kto_dataset_name`` the rated images of the KTO term.
    ``per_device_train_batch_size`` is the number of DPO pairs per micro-step, ``grpo_batch_size`` the number of
    rollouts (default: the same), ``kto_batch_size`` the number of rated images (default: the same)."""

    grpo_dataset_name: str | None = field(
        default=None, metadata={"help": "Prompts for the online term (.jsonl with 'prompt' + reward columns); or train_prompts."}
    )
    w_grpo: float = field(default=0.0, metadata={"help": "The older name of w_online: a weight > 0 without online runs Flow-GRPO as the online term."})
    online: str | None = field(default=None, metadata={"help": "The online term: grpo (Flow-GRPO, SDE rollouts) | nft (DiffusionNFT) | awm | dgpo (ODE rollouts). Unset: grpo when w_grpo > 0, else none."})
    w_online: float | None = field(default=None, metadata={"help": "Weight of the online term (w_grpo is its older name; default: w_grpo when > 0, else 1 when online is set). 0 switches the term off."})
    true_cfg_scale: float | None = field(default=None, metadata={"help": "True CFG of the rollouts (and of GRPO's training forward): unset = 4 for grpo, 1 (CFG-free) for nft / awm / dgpo, which refuse > 1 where it breaks them."})

    log_term_grad_norms: bool = field(default=False, metadata={"help": "Log each part's gradient norm before clipping (grad_norm/offline: DPO + KL + KTO + SFT; grad_norm/<method>: the online term): what to read when choosing w_online. One process; costs two copies of the trainable gradients; nothing to compare (so nothing logged) with the online term off, which keeps a w_online: 0 ablation of the same recipe running."})

    w_kto: float = field(default=0.0, metadata={"help": "Weight of the Diffusion-KTO term on kto_dataset_name (rated images; combined trainer)."})
    kto_dataset_name: str | None = field(
        default=None, metadata={"help": "Rated images for the KTO term: a rating project's pull (labels: desirable_threshold, undesirable_threshold, min_raters...)."}
    )
    kto_beta: float = field(default=KTO_BETA, metadata={"help": "KTO temperature of the KTO term (KTOConfig's beta)."})
    kto_batch_size: int | None = field(default=None, metadata={"help": "Rated images per process per micro-step (default: per_device_train_batch_size)."})

    def __post_init__(self):
        self._monitor_defaults()
        if self.log_term_grad_norms and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or self.deepspeed):
            raise UserError("log_term_grad_norms works in one process without DeepSpeed (after DDP's all-reduce the "
                            "parts' gradients mix): run the diagnostic on one process, or drop the option")
        super().__post_init__()
        self._resolve_online()
        self._validate_kto_term()
        method = self.online_method
        if method is None and self.has_monitor:
            raise UserError("monitor_prompts / monitor_dataset_name evaluate the online term, which is off "
                            "(w_online 0): unset them (and eval_strategy), or give the online term a weight")
        if method is None:
            return
        if method == "grpo":
            self._validate_grpo()
        else:
            self._validate_online()
            getattr(self, f"_validate_{method}")()

    def _validate_kto_term(self) -> None:
        if self.w_kto < 0:
            raise UserError(f"w_kto must be >= 0, got {self.w_kto}")
        if self.w_kto > 0:
            self._validate_rating_labels()
            if not self.kto_dataset_name:
                raise UserError("w_kto > 0 needs kto_dataset_name: the rated images of the KTO term (a rating project's pull)")
            if self.kto_beta <= 0:
                raise UserError(f"kto_beta must be > 0, got {self.kto_beta}")
            if self.kl_estimate == "mismatched" and self.kto_images_per_step < 2:
                raise UserError("kl_estimate mismatched needs kto_batch_size >= 2")

    @property
    def kto_images_per_step(self) -> int:
        return self.kto_batch_size or self.per_device_train_batch_size

    def _resolve_online(self) -> None:
        if self.online is not None and self.online not in ONLINE_METHODS:
            raise UserError(f"online must be one of {ONLINE_METHODS}, got {self.online!r}")
        if self.w_grpo < 0:
            raise UserError(f"w_grpo must be >= 0, got {self.w_grpo}")
        if self.w_online is not None and self.w_online < 0:
            raise UserError(f"w_online must be >= 0, got {self.w_online}")
        if self.w_online is not None and self.w_grpo > 0 and self.w_online != self.w_grpo:
            raise UserError(f"w_grpo ({self.w_grpo}) is the older name of w_online ({self.w_online}): set only one")
        if self.w_online is None:
            self.w_online = self.w_grpo if self.w_grpo > 0 else (1.0 if self.online else 0.0)
        if self.online is None and self.w_online > 0:
            self.online = "grpo"
        self.w_grpo = self.w_online  # every reader of the older name sees the online term's weight
        if self.true_cfg_scale is None:
            self.true_cfg_scale = DEFAULT_ROLLOUT_CFG.get(self.online or "grpo", 4.0)

    @property
    def online_method(self) -> str | None:
        """The online term's method, or None when it is off (no method or weight 0)."""
        return self.online if self.w_online and self.w_online > 0 else None
