"""Trainers: transformers.Trainer subclasses for SFT, Flow-DPO, Flow-GRPO and the combined objective."""
