"""qwen-image-align: SFT, Flow-DPO and Flow-GRPO for Qwen-Image."""

from qwen_image.errors import UserError

from .quiet import install as _install_quiet_filters

# Before any entry point (CLI, launch scripts, demo) imports the libraries whose import-time chatter it silences.
_install_quiet_filters()

__all__ = ["UserError"]
