"""Samplers over packed latents: the ODE Euler sampler with true CFG (QwenImagePipeline's loop) and the
Flow-GRPO SDE sampler that records per-step Gaussian log-probs, means and stds.

What conditions the transformer travels as one :class:`Conditioning`: the prompt embeddings and mask, and for the
edit models (Edit-2509 / 2511) the reference images' packed VAE latents with their grids (:class:`References`).
:func:`predict_velocity` appends the reference tokens after the noisy target tokens and keeps only the target part
of the output, as ``QwenImageEditPlusPipeline`` does, so every caller (samplers, losses, rollouts, the reference
model) trains or samples an edit model without knowing it is one. Text-to-image is the case ``references=None``.

All SDE math runs in fp32 (bf16 overflows in the log-prob). Formulas and conventions: docs/math.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm


@dataclass
class References:
    """Reference (control) images of an edit as the transformer reads them.

    ``latents``: (B, L_1 + ... + L_n, 64), each reference's normalised VAE latents packed 2x2, concatenated in
    reference order. ``shapes``: one ``(1, h/16, w/16)`` grid per reference, shared by the whole batch (tokens of
    different lengths cannot share a batch; the edit buckets guarantee equal sizes).

    Edit-2511's ``zero_cond_t`` (reference tokens modulated at t = 0) is a flag of the transformer's config that the
    transformer applies itself, telling reference tokens from target tokens by these grids: nothing to carry here.
    """

    latents: torch.Tensor
    shapes: list[tuple[int, int, int]]

    def __post_init__(self):
        self.shapes = [tuple(int(v) for v in s) for s in self.shapes]
        tokens = sum(f * h * w for f, h, w in self.shapes)
        if self.latents.dim() != 3 or self.latents.shape[1] != tokens:
            raise ValueError(f"reference latents {tuple(self.latents.shape)} do not hold the {tokens} tokens of "
                             f"grids {self.shapes}")

    def repeat_interleave(self, n: int) -> "References":
        return self if n == 1 else References(self.latents.repeat_interleave(n, 0), self.shapes)

    def repeat(self, n: int) -> "References":
        """The batch tiled ``n`` times (rows 0..B-1, 0..B-1, ...), like ``embeds.repeat(n, 1, 1)``."""
        return self if n == 1 else References(self.latents.repeat(n, 1, 1), self.shapes)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "References":
        return References(self.latents.to(device=device, dtype=dtype), self.shapes)

    def select(self, index) -> "References":
        return References(self.latents[index], self.shapes)


@dataclass
class Conditioning:
    """What conditions the transformer: text embeddings (``mask`` None when no token is padding, as the pipeline
    does) and, for the edit models, the reference images (None for text-to-image).

    ``img_mask`` (Qwen-Image-2.1 only, None otherwise): (B, L) bool, True at the text encoder's image slots among
    the embeddings' positions (each slot stands for a 2x2 group of a reference's latent tokens); every row must
    share one layout, as the 2.1 transformer reads it from the first row."""

    embeds: torch.Tensor
    mask: torch.Tensor | None
    references: References | None = None
    img_mask: torch.Tensor | None = None

    @classmethod
    def from_padded(
        cls, embeds: torch.Tensor, mask: torch.Tensor | None, references: References | None = None,
        img_mask: torch.Tensor | None = None,
    ) -> "Conditioning":
        if mask is not None and bool(mask.all()):
            mask = None
        return cls(embeds, mask, references, img_mask)

    def repeat_interleave(self, n: int) -> "Conditioning":
        if n == 1:
            return self
        mask = None if self.mask is None else self.mask.repeat_interleave(n, 0)
        refs = None if self.references is None else self.references.repeat_interleave(n)
        img_mask = None if self.img_mask is None else self.img_mask.repeat_interleave(n, 0)
        return Conditioning(self.embeds.repeat_interleave(n, 0), mask, refs, img_mask)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move every tensor (the masks keep their integer/bool dtype)."""
        mask = None if self.mask is None else self.mask.to(device)
        refs = None if self.references is None else self.references.to(device, dtype)
        img_mask = None if self.img_mask is None else self.img_mask.to(device)
        return Conditioning(self.embeds.to(device=device, dtype=dtype), mask, refs, img_mask)

    def select(self, index) -> "Conditioning":
        """Rows ``index`` (an int list, slice or index tensor) of every field."""
        mask = None if self.mask is None else self.mask[index]
        refs = None if self.references is None else self.references.select(index)
        img_mask = None if self.img_mask is None else self.img_mask[index]
        return Conditioning(self.embeds[index], mask, refs, img_mask)


def full_img_shapes(img_shapes: list, references: References | None) -> list:
    """Per-sample grids the transformer needs: the target's (what callers pass, nested ``[[(1, h, w)]] * B`` or
    flat ``[(1, h, w)] * B``) followed by each reference's. Unchanged for text-to-image."""
    if references is None:
        return img_shapes
    out = []
    for s in img_shapes:
        target = [tuple(s)] if len(s) == 3 and all(isinstance(v, int) for v in s) else [tuple(t) for t in s][:1]
        out.append(target + list(references.shapes))
    return out


def predict_velocity(
    transformer,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    cond: Conditioning,
    img_shapes: list,
    negative: Conditioning | None = None,
    true_cfg_scale: float = 1.0,
    attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """v = eps - x0 at noise level ``sigma`` (scalar or per-sample), with true CFG and norm rescale when
    ``true_cfg_scale > 1`` and a negative conditioning is given (the uncond branch carries no gradient).

    ``img_shapes`` are the target's grids; with ``cond.references`` the reference tokens are appended to
    ``latents`` (their grids to ``img_shapes``) and the velocity of the target tokens alone is returned. Both CFG
    branches see ``cond``'s references, as in ``QwenImageEditPlusPipeline`` (the negative carries only text)."""
    batch = latents.shape[0]
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(sigma)
    # The pipeline passes scheduler timesteps (sigma * 1000) divided by 1000: keep the same float path.
    timestep = (sigma.to(torch.float32) * 1000).expand(batch).to(latents.dtype).to(latents.device) / 1000
    refs = cond.references
    hidden = latents
    if refs is not None:
        if refs.latents.shape[0] != batch:
            raise ValueError(f"{refs.latents.shape[0]} rows of reference latents for a batch of {batch}")
        hidden = torch.cat([latents, refs.latents.to(device=latents.device, dtype=latents.dtype)], dim=1)
    shapes = full_img_shapes(img_shapes, refs)
    target_len = latents.shape[1]

    def forward(c: Conditioning) -> torch.Tensor:
        out = transformer(
            hidden_states=hidden, timestep=timestep, encoder_hidden_states=c.embeds,
            encoder_hidden_states_mask=c.mask, img_shapes=shapes, attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        return out if refs is None else out[:, :target_len]

    v = forward(cond)
    if negative is None or true_cfg_scale <= 1.0:
        return v
    with torch.no_grad():
        v_neg = forward(negative)
    comb = v_neg + true_cfg_scale * (v - v_neg)
    return comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def ode_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Euler step x += (s_next - s) v, computed in fp32 like FlowMatchEulerDiscreteScheduler.step."""
    out = latents.to(torch.float32) + (sigma_next - sigma) * velocity.to(torch.float32)
    return out.to(latents.dtype)


def sde_std(sigma: torch.Tensor, noise_level: float, sigma_max: float) -> torch.Tensor:
    """Flow-GRPO's std_dev_t = a * sqrt(s / (1 - s)), with s = 1 replaced by sigma_max in the denominator."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    denom = 1 - torch.where(sigma >= 1, torch.as_tensor(sigma_max, dtype=torch.float32), sigma)
    return torch.sqrt(sigma / denom) * noise_level


@dataclass
class SDEStep:
    prev_sample: torch.Tensor
    log_prob: torch.Tensor  # (B,) mean over non-batch dims
    mean: torch.Tensor
    std: torch.Tensor  # scalar: std_dev_t * sqrt(|dt|), the Gaussian's std per element


Generators = torch.Generator | Sequence[torch.Generator] | None


def sde_noise_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample for the SDE noise, derived from the sample's seed (not the initial-noise stream
    of the same seed), so each sample's noise follows its own seed whatever the batch it is drawn in."""
    return [torch.Generator("cpu").manual_seed((int(s) * 2_654_435_761 + 97) % (2**63 - 1)) for s in seeds]


def draw_noise(shape: Sequence[int], generator: Generators, device: torch.device) -> torch.Tensor:
    """fp32 Gaussian noise of ``shape``; a list of generators draws sample ``i`` of the batch from ``generator[i]``."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32, device=g.device)
                             for g in generator])
        return noise.to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=gen_device).to(device)


def sde_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise_level: float,
    sigma_max: float,
    prev_sample: torch.Tensor | None = None,
    generator: Generators = None,
    sample_dtype: torch.dtype | None = None,
) -> SDEStep:
    """One Euler-Maruyama step of the marginal-preserving SDE and the log-density of ``prev_sample`` under it.

    mean = x + [v + std_t^2/(2s) (x + (1-s) v)] dt (dt < 0); x' = mean + std_t sqrt(-dt) eps.
    Pass ``prev_sample`` to score a stored transition (training); otherwise one is drawn. A drawn sample is
    rounded to ``sample_dtype`` (the latents' dtype, e.g. bf16) BEFORE its log-prob is taken: the trajectory keeps
    the rounded sample, so the log-prob stored at rollout is the one training recomputes, bit for bit.
    """
    x = latents.to(torch.float32)
    v = velocity.to(torch.float32)
    dt = float(sigma_next) - float(sigma)
    std_t = sde_std(torch.tensor(float(sigma)), noise_level, sigma_max).to(x.device)
    mean = x + (v + std_t**2 / (2 * float(sigma)) * (x + (1 - float(sigma)) * v)) * dt
    step_std = std_t * math.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean + step_std * draw_noise(x.shape, generator, x.device)
        if sample_dtype is not None:
            prev_sample = prev_sample.to(sample_dtype)
    prev = prev_sample.to(torch.float32)
    if float(step_std) > 0:
        log_prob = (
            -((prev.detach() - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - 0.5 * math.log(2 * math.pi)
        )
        log_prob = log_prob.mean(dim=tuple(range(1, log_prob.dim())))
    else:
        log_prob = torch.zeros(x.shape[0], device=x.device)
    return SDEStep(prev_sample=prev, log_prob=log_prob, mean=mean, std=step_std)


@dataclass
class SampleOutput:
    latents: torch.Tensor  # final packed latents (B, L, 64)
    sigmas: torch.Tensor  # (T + 1,)
    trajectory: list[torch.Tensor] = field(default_factory=list)  # x_0..x_T when recorded (T + 1 entries)
    log_probs: torch.Tensor | None = None  # (B, T) ; zeros at ODE steps
    means: list[torch.Tensor] = field(default_factory=list)
    stds: torch.Tensor | None = None  # (T,)
    sde_steps: list[int] = field(default_factory=list)  # indices of steps taken with the SDE


def sample(
    transformer,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    img_shapes: list,
    negative: Conditioning | None = None,
    true_cfg_scale: float = 1.0,
    noise_level: float = 0.0,
    sde_window: tuple[int, int] | None = None,
    generator: Generators = None,
    record: bool = False,
    attention_kwargs: dict | None = None,
    progress: bool = False,
    velocity_fn: Callable | None = None,
) -> SampleOutput:
    """Integrate from noise (sigmas[0]) to data (sigmas[-1] = 0).

    ``noise_level == 0`` gives the deterministic ODE sampler (QwenImagePipeline's loop). ``noise_level > 0`` uses
    the SDE on the steps in ``sde_window`` = [start, end) (all steps when None) and the ODE elsewhere, and records
    log-probs for the SDE steps (Flow-GRPO / Flow-GRPO-Fast).

    ``velocity_fn`` (default :func:`predict_velocity`) is the model family's velocity call, with
    :func:`predict_velocity`'s signature: Qwen-Image-2.1 passes its own (``qwen_image.qwen_image_21``).
    """
    velocity_fn = velocity_fn or predict_velocity
    num_steps = len(sigmas) - 1
    window = range(num_steps) if sde_window is None else range(*sde_window)
    sigma_max = float(sigmas[1]) if num_steps > 1 else float(sigmas[0])
    out = SampleOutput(latents=latents, sigmas=sigmas)
    log_probs = torch.zeros(latents.shape[0], num_steps)
    stds = torch.zeros(num_steps)
    if record:
        out.trajectory.append(latents.detach().cpu())
    x = latents.contiguous()
    for i in tqdm(range(num_steps), disable=not progress, desc="denoising", leave=False):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        with torch.no_grad():
            v = velocity_fn(transformer, x, sigmas[i], cond, img_shapes, negative, true_cfg_scale, attention_kwargs)
        if noise_level > 0 and i in window:
            step = sde_step(x, v, s, s_next, noise_level, sigma_max, generator=generator, sample_dtype=latents.dtype)
            x = step.prev_sample.to(latents.dtype).contiguous()
            log_probs[:, i] = step.log_prob.cpu()
            stds[i] = float(step.std)
            out.sde_steps.append(i)
            if record:
                out.means.append(step.mean.detach().cpu())
        else:
            x = ode_step(x, v, s, s_next).contiguous()
            if record:
                out.means.append(x.detach().float().cpu())
        if record:
            out.trajectory.append(x.detach().cpu())
    out.latents = x
    out.log_probs = log_probs
    out.stds = stds
    return out
