"""Qwen-Image's flow-matching scheduler and its resolution-dependent time shift.

Conventions (diffusers): sigma in [0, 1], 1 = pure noise; x_s = (1 - s) x0 + s eps; the model predicts
v = eps - x0 and is called with ``timestep = sigma``; an Euler step is x += (s_next - s) v.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

# Real Qwen/Qwen-Image scheduler/scheduler_config.json.
QWEN_IMAGE_SCHEDULER_CONFIG: dict = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)


def shift_mu(scheduler: FlowMatchEulerDiscreteScheduler, image_seq_len: int) -> float:
    """The exponential-shift parameter mu for an image of ``image_seq_len`` packed tokens (as the pipeline does)."""
    cfg = scheduler.config
    return calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )


def inference_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, num_inference_steps: int, image_seq_len: int
) -> torch.Tensor:
    """The sigmas QwenImagePipeline walks through, with the terminal 0 appended (length steps + 1)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    base = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    scheduler.set_timesteps(sigmas=base, mu=shift_mu(scheduler, image_seq_len))
    return scheduler.sigmas.to(torch.float32).clone()

