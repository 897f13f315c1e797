"""Latent-space helpers: size rules, VAE normalisation, 2x2 packing (QwenImagePipeline's layout)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage, AutoencoderKLQwenImage21
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from PIL import Image

from .errors import QwenImageInputError

VAE_SCALE_FACTOR = 8
SIZE_MULTIPLE = 16  # 8x VAE downsampling times the 2x2 packing


def check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
            raise QwenImageInputError(
                f"{name}={value!r} is not a positive multiple of {SIZE_MULTIPLE} px; "
                f"use e.g. {max(SIZE_MULTIPLE, round((value if isinstance(value, int) else 0) / SIZE_MULTIPLE) * SIZE_MULTIPLE)}."
            )


def image_seq_len(height: int, width: int) -> int:
    return (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)


def img_shapes(batch_size: int, height: int, width: int) -> list[list[tuple[int, int, int]]]:
    return [[(1, height // SIZE_MULTIPLE, width // SIZE_MULTIPLE)]] * batch_size


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, C, 1, H, W) latents -> (B, H/2*W/2, 4C) tokens."""
    if latents.dim() == 5:
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, L, 4C) tokens -> (B, C, 1, H/8, W/8) latents for an image of ``height`` x ``width`` px."""
    return QwenImagePipeline._unpack_latents(tokens, height, width, VAE_SCALE_FACTOR)


def _stats(vae: AutoencoderKLQwenImage | AutoencoderKLQwenImage21, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


def images_to_tensor(images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """PIL images -> (B, 3, 1, H, W) in [-1, 1], resized (bicubic) to height x width."""
    arrays = []
    for img in images:
        img = img.convert("RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).unsqueeze(2)


def tensor_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (B, 3, 1, H, W) in [-1, 1] -> PIL images."""
    if pixels.dim() == 5:
        pixels = pixels[:, :, 0]
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def encode(vae: AutoencoderKLQwenImage | AutoencoderKLQwenImage21, pixels: torch.Tensor, sample: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, 1, H, W) pixels in [-1, 1] -> normalised latents (B, 16, 1, H/8, W/8): (z - mean) / std (the mode
    unless ``sample``). Any VAE with ``latents_mean`` / ``latents_std`` in its config: Qwen-Image-2.1's RGBA VAE
    takes (B, 4, 1, H, W) and gives (B, 64, 1, H/16, W/16), the mode being how its pipeline encodes images."""
    pixels = pixels.to(vae.device, vae.dtype)
    dist = vae.encode(pixels).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    mean, std = _stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def decode(vae: AutoencoderKLQwenImage | AutoencoderKLQwenImage21, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, 16, 1, h, w) -> pixels (B, 3, H, W) in [-1, 1] (2.1's VAE: (B, 64, 1, h, w) -> RGBA
    (B, 4, H, W))."""
    latents = latents.to(vae.device, vae.dtype)
    mean, std = _stats(vae, latents)
    return vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
