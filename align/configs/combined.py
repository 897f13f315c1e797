"""Options of the combined objective: the Flow-DPO fields plus the GRPO ones and the GRPO prompt set, and the KTO
term on a rated dataset (``w_kto``, ``kto_dataset_name`` and the rating labels of :mod:`align.configs.kto`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_image.errors import UserError

from ..losses.kto import KTO_BETA
from .dpo import DPOConfig
from .grpo import GRPOArguments
from .kto import RatingLabelArguments


@dataclass
class DPOGRPOConfig(GRPOArguments, RatingLabelArguments, DPOConfig):
    """Flow-DPO settings plus the GRPO ones; ``dataset_name`` holds the pairs, ``grpo_dataset_name`` the prompts,
    ``kto_dataset_name`` the rated images of the KTO term. ``per_device_train_batch_size`` is the number of DPO
    pairs per micro-step, ``grpo_batch_size`` the number of rollouts (default: the same), ``kto_batch_size`` the
    number of rated images (default: the same)."""

    grpo_dataset_name: str | None = field(
        default=None, metadata={"help": "Prompts for the GRPO term (.jsonl with 'prompt' + reward columns); or train_prompts."}
    )

    w_kto: float = field(default=0.0, metadata={"help": "Weight of the Diffusion-KTO term on kto_dataset_name (rated images; combined trainer)."})
    kto_dataset_name: str | None = field(
        default=None, metadata={"help": "Rated images for the KTO term: a rating project's pull (labels: desirable_threshold, undesirable_threshold, min_raters...)."}
    )
    kto_beta: float = field(default=KTO_BETA, metadata={"help": "KTO temperature of the KTO term (KTOConfig's beta)."})
    kto_batch_size: int | None = field(default=None, metadata={"help": "Rated images per process per micro-step (default: per_device_train_batch_size)."})

    def __post_init__(self):
        self._monitor_defaults()
        super().__post_init__()
        if self.w_grpo > 0:
            self._validate_grpo()
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
