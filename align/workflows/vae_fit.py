"""Stage 0 of the CPU demo: fit the tiny random VAE to the brand renders so that text survives encode/decode.

A real checkpoint's VAE is already trained and never goes through this; the tiny model's VAE is random, so without
this stage nothing it decodes is legible and every OCR score would be 0.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders import autoencoder_kl_qwenimage as _vae_module
from PIL import Image

from qwen_image import latents as L

logger = logging.getLogger(__name__)


def _single_frame_conv(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    # An image is one frame and causal padding puts zeros before it, so only the last temporal tap of each 3-D
    # kernel ever sees data: a 2-D conv with that tap is exact and about 3x cheaper on CPU.
    if x.shape[2] == 1 and cache_x is None:
        pad_w, pad_h = self._padding[0], self._padding[2]
        y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, stride=self.stride[1:], padding=(pad_h, pad_w))
        return y.unsqueeze(2)
    return _ORIGINAL_FORWARD(self, x, cache_x)


_ORIGINAL_FORWARD = _vae_module.QwenImageCausalConv3d.forward


@contextlib.contextmanager
def single_frame_convs() -> Iterator[None]:
    """Temporarily run the VAE's causal 3-D convs as 2-D convs on single images (same numbers, faster)."""
    _vae_module.QwenImageCausalConv3d.forward = _single_frame_conv
    try:
        yield
    finally:
        _vae_module.QwenImageCausalConv3d.forward = _ORIGINAL_FORWARD


def ink_weights(pixels: torch.Tensor, weight: float) -> torch.Tensor:
    """1 + weight on pixels that differ from the image's corner colour: text strokes are a few percent of the
    pixels, and an unweighted loss first learns to paint the background only."""
    corner = pixels[..., :1, :1]
    return 1.0 + weight * ((pixels - corner).abs().amax(1, keepdim=True) > 0.3).float()


def fit_vae(
    vae: AutoencoderKLQwenImage,
    images: Sequence[Image.Image],
    size: int,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 6,
    ink_weight: float = 4.0,
    warmup_steps: int = 30,
    seed: int = 0,
    log_every: int = 50,
) -> list[dict]:
    """Train ``vae`` (in place) to reconstruct ``images`` with an ink-weighted L1+L2 loss on the posterior mode.

    Afterwards ``latents_mean``/``latents_std`` in its config are set to the statistics of the fitted latents, so
    the normalised latents the transformer sees have unit scale as with the real VAE. Returns the loss history.
    """
    if steps < 0 or not images:
        raise ValueError("fit_vae needs steps >= 0 and at least one image")
    generator = torch.Generator().manual_seed(seed)
    pixels = L.images_to_tensor(list(images), size, size)
    weights = ink_weights(pixels, ink_weight)
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    history: list[dict] = []
    start = time.time()
    with single_frame_convs():
        for step in range(1, steps + 1):
            idx = torch.randperm(len(pixels), generator=generator)[:batch_size]
            x, w = pixels[idx], weights[idx]
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
            diff = rec - x
            loss = (w * (diff.abs() + diff.pow(2))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            history.append({"step": step, "loss": float(loss)})
            if log_every and (step % log_every == 0 or step == steps):
                print(f"  vae fit step {step}/{steps} loss {float(loss):.4f} ({time.time() - start:.0f} s)", flush=True)
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            z = torch.cat([vae.encode(pixels[i:i + 16]).latent_dist.mode() for i in range(0, len(pixels), 16)])
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=[round(float(v), 6) for v in mean], latents_std=[round(float(v), 6) for v in std])
    return history


@torch.no_grad()
def reconstruct(vae: AutoencoderKLQwenImage, images: Sequence[Image.Image], size: int) -> list[Image.Image]:
    """Encode (posterior mode) and decode ``images``: what the fitted VAE keeps of them."""
    with single_frame_convs():
        pixels = L.images_to_tensor(list(images), size, size)
        return L.tensor_to_images(vae.decode(vae.encode(pixels).latent_dist.mode()).sample)
