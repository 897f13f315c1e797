"""Options of the combined objective ``L = w_dpo DPO + w_online L_online + beta_kl KL (+ w_sft FM)``: the Flow-DPO
fields, the online term's (``online: grpo | nft | awm | dgpo`` and each method's own fields) and its prompt set.

``w_grpo`` is the older name of ``w_online``: a recipe with ``w_grpo > 0`` and no ``online`` runs Flow-GRPO as
before. After parsing, ``w_grpo`` and ``w_online`` hold the same value (the online term's weight) and
``online_method`` the method, or None when the online term is off."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_image.errors import UserError

from .dpo import DPOConfig
from .forward import ONLINE_METHODS, AWMArguments, DGPOArguments, NFTArguments
from .grpo import GRPOArguments

# Rollout CFG when true_cfg_scale is left unset: Flow-GRPO's SDE rollouts as before; the forward-process methods
# train on CFG-free samples.
DEFAULT_ROLLOUT_CFG = {"grpo": 4.0, "nft": 1.0, "awm": 1.0, "dgpo": 1.0}


@dataclass
class DPOGRPOConfig(GRPOArguments, NFTArguments, AWMArguments, DGPOArguments, DPOConfig):
    """Flow-DPO settings plus the online term's; ``dataset_name`` holds the pairs, ``grpo_dataset_name`` the prompts.
    ``per_device_train_batch_size`` is the number of DPO pairs per micro-step, ``grpo_batch_size`` the number of
    rollouts (default: the same)."""

    grpo_dataset_name: str | None = field(
        default=None, metadata={"help": "Prompts for the online term (.jsonl with 'prompt' + reward columns); or train_prompts."}
    )
    online: str | None = field(default=None, metadata={"help": "The online term: grpo (Flow-GRPO, SDE rollouts) | nft (DiffusionNFT) | awm | dgpo (ODE rollouts). Unset: grpo when w_grpo > 0, else none."})
    w_online: float | None = field(default=None, metadata={"help": "Weight of the online term (w_grpo is its older name; default: w_grpo when > 0, else 1 when online is set). 0 switches the term off."})
    true_cfg_scale: float | None = field(default=None, metadata={"help": "True CFG of the rollouts (and of GRPO's training forward): unset = 4 for grpo, 1 (CFG-free) for nft / awm / dgpo, which refuse > 1 where it breaks them."})

    def __post_init__(self):
        self._monitor_defaults()
        super().__post_init__()
        self._resolve_online()
        method = self.online_method
        if method is None:
            return
        if method == "grpo":
            self._validate_grpo()
        else:
            self._validate_online()
            getattr(self, f"_validate_{method}")()

    def _resolve_online(self) -> None:
        if self.online is not None and self.online not in ONLINE_METHODS:
            raise UserError(f"online must be one of {ONLINE_METHODS}, got {self.online!r}")
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
