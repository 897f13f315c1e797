"""Flow-matching (rectified flow) objective in diffusers' convention: x_s = (1 - s) x0 + s eps, target v = eps - x0
(docs/math.md)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from qwen_image.scheduler import shift_mu

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode", "qwen_shift")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


def sample_sigmas(
    batch_size: int,
    scheme: str = "qwen_shift",
    image_seq_len: int = 4096,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training noise levels sigma in (0, 1) (docs/math.md, "Timestep sampling").

    ``uniform`` / ``logit_normal`` / ``mode`` use diffusers' ``compute_density_for_timestep_sampling``;
    ``qwen_shift`` draws uniform sigma and applies the resolution-dependent time shift of ``scheduler`` (the loaded
    checkpoint's, so training sees the noise levels its sampler uses at this image size). Draws happen on the CPU
    with ``generator``, so a seeded run repeats exactly on any device.
    """
    if scheme not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {scheme!r}")
    if scheme == "qwen_shift":
        if scheduler is None:
            raise ValueError("timestep_sampling='qwen_shift' needs the model's scheduler (its shift settings)")
        u = torch.rand(batch_size, generator=generator).clamp(1e-5, 1 - 1e-5)
        sigma = scheduler.time_shift(shift_mu(scheduler, image_seq_len), 1.0, u)
    else:
        weighting = "none" if scheme == "uniform" else scheme
        sigma = compute_density_for_timestep_sampling(weighting, batch_size, logit_mean=logit_mean, logit_std=logit_std,
                                                      mode_scale=mode_scale, generator=generator)
    return sigma.clamp(1e-4, 1 - 1e-4).to(device)


def make_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x_sigma, target velocity) for packed latents (B, L, C) and per-sample sigma (B,)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def velocity_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared velocity error (B,), computed in fp32."""
    err = (pred.float() - target.float()) ** 2
    return err.mean(dim=tuple(range(1, err.dim())))


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, weighting: str = "none"
) -> torch.Tensor:
    """w(sigma) * ||v_pred - (eps - x0)||^2, mean over dims then batch (diffusers' SD3/Qwen-Image form)."""
    if weighting not in LOSS_WEIGHTING:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTING}, got {weighting!r}")
    w = compute_loss_weighting_for_sd3(weighting, sigma.float()).view(-1)
    return (w * velocity_error(pred, target)).mean()
