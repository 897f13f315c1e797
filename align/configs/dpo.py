"""Flow-DPO options (TRL's ``beta`` / ``loss_type``) and the weights of its terms on the pairs (DPO, the velocity-form
KL, flow matching on the chosen images). The combined objective's online and KTO terms are
:mod:`align.configs.combined`'s."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_image.errors import UserError

from ..losses import DPO_LOSS_TYPES
from .base import EncodingArguments, FlowMatchingArguments, QwenImageTrainingConfig


@dataclass
class DPOConfig(FlowMatchingArguments, EncodingArguments, QwenImageTrainingConfig):
    """Flow-DPO settings (TRL's names ``beta``, ``loss_type``) plus the weights of its terms on the pairs."""

    beta: float = field(
        default=100.0,
        metadata={"help": "DPO temperature. Errors are MEANS over latent dims, so it is far larger than LLM DPO's 0.1: "
                          "flow_grpo's Flow-DPO uses 100 on the same quantity (Diffusion-DPO used 2500-5000 on SD's eps-MSE)."},
    )
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {DPO_LOSS_TYPES} (TRL's forms)."})
    min_agreement: float = field(default=0.0, metadata={"help": "Drop pairs whose rater agreement is below this (0-1)."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Hold out this fraction of pairs to report eval implicit accuracy."})
    reference_offload: bool = field(default=False, metadata={"help": "Full fine-tune: keep the frozen copy on CPU between uses (single process / DDP)."})
    w_dpo: float = field(default=1.0, metadata={"help": "Weight of the DPO term."})
    beta_kl: float = field(default=0.0, metadata={"help": "Weight of the KL to the reference (velocity form on DPO batches); ADDED to the loss."})
    w_sft: float = field(default=0.0, metadata={"help": "Weight of flow matching on the chosen images (keeps the policy on the data)."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in DPO_LOSS_TYPES:
            raise UserError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise UserError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("w_dpo", "beta_kl", "w_sft"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
