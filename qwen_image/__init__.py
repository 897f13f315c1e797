"""The complete Qwen-Image model bundle on diffusers and transformers classes."""

from .errors import QwenImageInputError
from .latents import check_size, pack, unpack
from .model import QwenImage, resolve_dtype
from .sampling import Conditioning, References, SampleOutput, predict_velocity, sample, sde_step
from .scheduler import QWEN_IMAGE_SCHEDULER_CONFIG, inference_sigmas, make_scheduler

__all__ = [
    "QwenImage", "QwenImageInputError", "Conditioning", "References", "SampleOutput", "predict_velocity", "sample", "sde_step",
    "QWEN_IMAGE_SCHEDULER_CONFIG", "inference_sigmas", "make_scheduler", "check_size", "pack", "unpack", "resolve_dtype",
]
