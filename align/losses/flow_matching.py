"""Flow-matching (rectified flow) objective in diffusers' convention: x_s = (1 - s) x0 + s eps, target v = eps - x0."""

from __future__ import annotations

import math

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode", "qwen_shift")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


def sample_sigmas(
    batch_size: int,
    scheme: str = "qwen_shift",
    image_seq_len: int = 4096,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 8192,
    base_shift: float = 0.5,
    max_shift: float = 0.9,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training noise levels sigma in (0, 1).

    ``uniform`` / ``logit_normal`` / ``mode`` use diffusers' ``compute_density_for_timestep_sampling``;
    ``qwen_shift`` draws uniform sigma and applies Qwen-Image's resolution-dependent exponential shift
    (the same mu the sampler uses at this image size, so training matches inference's noise levels).
    """
    if scheme not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {scheme!r}")
    if scheme == "qwen_shift":
        u = torch.rand(batch_size, generator=generator)
        m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
        mu = image_seq_len * m + (base_shift - m * base_image_seq_len)
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u.clamp(1e-5, 1 - 1e-5) - 1))
    else:
        weighting = "none" if scheme == "uniform" else scheme
        sigma = compute_density_for_timestep_sampling(
            weighting, batch_size, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale
        ) if generator is None else _density_with_generator(weighting, batch_size, logit_mean, logit_std, mode_scale, generator)
    return sigma.clamp(1e-4, 1 - 1e-4).to(device)


def _density_with_generator(weighting, batch_size, logit_mean, logit_std, mode_scale, generator):
    # diffusers' helper takes no generator; the same formulas, seeded (needed for exact resume checks).
    if weighting == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (batch_size,), generator=generator))
    u = torch.rand(batch_size, generator=generator)
    if weighting == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


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
