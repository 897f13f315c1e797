"""Options of the combined DPO + GRPO objective: the Flow-DPO fields plus the GRPO ones, and the GRPO prompt set."""

from __future__ import annotations

from dataclasses import dataclass, field

from .dpo import DPOConfig
from .grpo import GRPOArguments


@dataclass
class DPOGRPOConfig(GRPOArguments, DPOConfig):
    """Flow-DPO settings plus the GRPO ones; ``dataset_name`` holds the pairs, ``grpo_dataset_name`` the prompts.
    ``per_device_train_batch_size`` is the number of DPO pairs per micro-step, ``grpo_batch_size`` the number of
    rollouts (default: the same)."""

    grpo_dataset_name: str | None = field(
        default=None, metadata={"help": "Prompts for the GRPO term (.jsonl with 'prompt' + reward columns); or train_prompts."}
    )

    def __post_init__(self):
        self._monitor_defaults()
        super().__post_init__()
        if self.w_grpo > 0:
            self._validate_grpo()
