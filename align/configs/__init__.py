"""Training configs, one module per trainer (as TRL keeps ``trainer/dpo_config.py`` apart from the trainer):

- ``base``: the field groups (``ModelArguments``, ``MemoryArguments``, ``ImageDataArguments``,
  ``EncodingArguments``, ``TimestepArguments`` / ``FlowMatchingArguments``, ``ValidationArguments``) and
  ``QwenImageTrainingConfig`` (``transformers.TrainingArguments`` plus the groups every objective reads);
- ``sft``: ``SFTConfig``; ``dpo``: ``DPOConfig``; ``kto``: ``KTOConfig``; ``grpo``: ``OnlineArguments``,
  ``GRPOArguments`` (mixins) and ``GRPOConfig``; ``forward``: NFT / AWM / DGPO; ``combined``: ``DPOGRPOConfig``.

Each objective's config composes only the groups its trainer reads. Only the shared base is imported here, so
``import align.configs`` stays light."""

from .base import DEFAULT_LORA_TARGETS, QwenImageTrainingConfig

__all__ = ["DEFAULT_LORA_TARGETS", "QwenImageTrainingConfig"]
