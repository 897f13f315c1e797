"""qwen-image-align: SFT, Flow-DPO and Flow-GRPO for Qwen-Image."""

from qwen_image.errors import UserError

__all__ = ["UserError"]
