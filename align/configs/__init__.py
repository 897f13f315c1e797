"""Training configs, one module per trainer (as TRL keeps ``trainer/dpo_config.py`` apart from the trainer):

- ``base``: ``QwenImageTrainingConfig`` - ``transformers.TrainingArguments`` plus the model, LoRA, memory, data and
  flow-matching fields every trainer shares;
- ``sft``: ``SFTConfig``; ``dpo``: ``DPOConfig``; ``grpo``: ``GRPOArguments`` (mixin) and ``GRPOConfig``;
  ``combined``: ``DPOGRPOConfig``.

Only the shared base is imported here, so ``import align.configs`` stays light."""

from .base import DEFAULT_LORA_TARGETS, QwenImageTrainingConfig

__all__ = ["DEFAULT_LORA_TARGETS", "QwenImageTrainingConfig"]
