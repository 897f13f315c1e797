"""Rollouts of the forward-process objectives (DiffusionNFT, AWM, DGPO): the deterministic ODE sampler, CFG-free
by default, keeping only what their losses read - each sample's final clean latents ``x0``, the sampler's noise
levels (the timestep grid the trained ``t`` are taken from), the conditioning, and after scoring the rewards and
advantages. No trajectory and no log-probs: the losses rebuild ``x_t = (1 - t) x0 + t eps`` with fresh noise.

Edit models roll out the same way as for Flow-GRPO: each row's control images become the conditioning's
references (``rollout_conditioning``), so the trained and the old / reference velocities all see them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from PIL import Image

from qwen_image import QwenImage
from qwen_image.sampling import Conditioning, sample

from .rollouts import BufferedBatch, rollout_conditioning


@dataclass
class ForwardRolloutBatch(BufferedBatch):
    """One ODE-sampled micro-batch. ``x0`` (B, L, C) are the final latents in the sampler's dtype; ``sigmas``
    (T + 1,) the sampler's noise levels (``sigmas[:-1]`` are the T timesteps a loss may train on);
    ``sample_index`` (B,) each sample's index in the global generation batch (its group is
    ``sample_index // num_generations``)."""

    prompts: list[str]
    columns: dict[str, list]
    cond: Conditioning
    x0: torch.Tensor
    sigmas: torch.Tensor
    sample_index: torch.Tensor
    height: int
    width: int
    true_cfg_scale: float = 1.0
    images: list[Image.Image] = field(default_factory=list)
    rewards: torch.Tensor | None = None  # (B,) NaN where a reward does not apply
    rewards_per_func: dict[str, list[float | None]] = field(default_factory=dict)
    advantages: torch.Tensor | None = None  # (B,)

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("cond", "x0", "advantages")

    @property
    def timesteps(self) -> torch.Tensor:
        """The T noise levels the sampler evaluated the velocity at (the trainable timesteps)."""
        return self.sigmas[:-1]


@torch.no_grad()
def generate_ode_rollouts(
    qwen: QwenImage,
    transformer: torch.nn.Module,
    prompts: list[str],
    columns: dict[str, list] | None = None,
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    seeds: Sequence[int],
    sample_index: Sequence[int],
    true_cfg_scale: float = 1.0,
    negative_prompt: str | None = " ",
    decode: bool = True,
    reference_area: int | None = None,
) -> ForwardRolloutBatch:
    """Sample ``prompts`` with the Euler ODE sampler from each seed's initial noise (``transformer``: the sampling
    policy, already in the adapter state it should sample with) and keep x0 + the grid. ``true_cfg_scale > 1``
    samples with true CFG (only objectives that allow it ask for it); the training conditioning is the positive
    one either way."""
    qwen.check_size(height, width)
    device = next(transformer.parameters()).device
    cond, negative = rollout_conditioning(qwen, prompts, columns, true_cfg_scale, negative_prompt, reference_area, device)
    latents = qwen.initial_noise(len(prompts), height, width, list(seeds)).to(device)
    sigmas = qwen.inference_sigmas(num_inference_steps, height, width)
    # The bundle's velocity call (the model family's), with full forwards as training recomputes them.
    out = sample(transformer, latents, sigmas, cond, qwen.img_shapes(len(prompts), height, width), negative=negative,
                 true_cfg_scale=true_cfg_scale, velocity_fn=qwen.predict_velocity)
    images = qwen.decode_latents(out.latents, height, width) if decode else []
    return ForwardRolloutBatch(
        prompts=list(prompts), columns={k: list(v) for k, v in (columns or {}).items()}, cond=cond,
        x0=out.latents.detach().cpu(), sigmas=out.sigmas.detach().cpu().float(),
        sample_index=torch.as_tensor(list(sample_index), dtype=torch.long), height=height, width=width,
        true_cfg_scale=true_cfg_scale if negative is not None else 1.0, images=images,
    )
