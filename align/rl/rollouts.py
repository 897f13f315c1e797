"""Flow-GRPO rollouts: sample a batch of prompts with the SDE sampler, keep what training needs to re-score
each transition (trajectory, old log-probs, sigmas, conditioning), decode and score the images.

Edit models (Edit-2509 / 2511) roll out the same way: each prompt row's control images (the ``control_images``
column of an edit prompt set) become the conditioning's ``references``, so the SDE sampler, the recomputed
log-probs and the frozen reference's KL all see them through the one conditioning seam; text-to-image is the case
without references. The rewards receive the column too (``edit_consistency`` compares the edit with its source).

A ``RolloutBatch`` is generated and trained as one unit: the same prompts, padding and batch size at rollout and
at training make the recomputed log-probs bit-identical with unchanged weights (flow_grpo's FAQ: outputs differ
with batch size, so keep the training batch equal to the sampling batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Self, Sequence

import torch
from PIL import Image

from qwen_image import QwenImage
from qwen_image.errors import UserError
from qwen_image.latents import img_shapes
from qwen_image.sampling import Conditioning, SDEStep, predict_velocity, sample, sde_noise_generators, sde_std, sde_step

from ..data.edit import CONTROLS, open_control


class BufferedBatch:
    """What the rollout micro-batch dataclasses share: their size, their token grid, moving the fields that live on
    the training device (``DEVICE_FIELDS``, None allowed) and a checkpoint's copy (every field but the decoded
    images, on the CPU)."""

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ()
    prompts: list[str]
    height: int
    width: int

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def img_shapes(self) -> list:
        # The target's grid: one token per 16x16 px in every family (Qwen-Image 8x VAE + 2x2 packing, 2.1 16x VAE).
        return img_shapes(len(self), self.height, self.width)

    def _device_fields_on(self, device: torch.device | str) -> dict[str, Any]:
        return {name: None if getattr(self, name) is None else getattr(self, name).to(device)
                for name in self.DEVICE_FIELDS}

    def to(self, device: torch.device | str) -> Self:
        return replace(self, **self._device_fields_on(device))

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the batch (every field but the decoded images, on CPU)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "images"}
        out.update(self._device_fields_on("cpu"))
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Self:
        return cls(**state)


@dataclass
class RolloutBatch(BufferedBatch):
    """One sampled batch. ``trajectory[:, j]`` is x_j (x_0 = noise, x_T = final latents); step j maps x_j to x_{j+1}
    at noise levels ``sigmas[j] -> sigmas[j+1]``; ``log_probs[:, j]`` is its log-density at rollout (0 off the SDE)."""

    prompts: list[str]
    columns: dict[str, list]
    cond: Conditioning
    negative: Conditioning | None
    trajectory: torch.Tensor  # (B, T + 1, L, C)
    log_probs: torch.Tensor  # (B, T) fp32
    sigmas: torch.Tensor  # (T + 1,)
    sde_steps: list[int]
    height: int
    width: int
    noise_level: float
    true_cfg_scale: float
    sigma_max: float
    images: list[Image.Image] = field(default_factory=list)
    rewards: torch.Tensor | None = None  # (B,) NaN where a reward does not apply
    rewards_per_func: dict[str, list[float | None]] = field(default_factory=dict)
    advantages: torch.Tensor | None = None  # (B,)
    means: torch.Tensor | None = None  # (B, T, L, C) fp32 step means at rollout (kept for the guard / DPPO losses)

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("cond", "negative", "trajectory", "means")

    def x(self, j: int) -> torch.Tensor:
        """x_j as the sampler fed it to the transformer: a contiguous copy (a strided slice changes bf16 outputs)."""
        return self.trajectory[:, j].contiguous()

    def step_dt(self, j: int) -> float:
        return float(self.sigmas[j + 1]) - float(self.sigmas[j])

    def std_dev_t(self, j: int) -> torch.Tensor:
        """Flow-GRPO's sigma_t = a sqrt(s / (1 - s)) at step j (the per-element std is sigma_t sqrt(|dt|))."""
        return sde_std(self.sigmas[j], self.noise_level, self.sigma_max)


def control_images(qwen: QwenImage, columns: dict[str, list] | None, n: int) -> list[list[Image.Image]] | None:
    """Each row's control images for an edit model (the ``control_images`` column: cells of
    ``align.data.edit`` or PIL images); None for a text-to-image model."""
    if not qwen.edit_model:
        return None
    cells = (columns or {}).get(CONTROLS)
    if cells is None:
        raise UserError(f"an edit model's prompts need control images: the rows have no {CONTROLS!r} column (load "
                        "them with align.data.prompts.load_prompt_dataset(..., edit=EditPromptColumns()))")
    if len(cells) != n:
        raise ValueError(f"{len(cells)} rows of control images for {n} prompts")
    return [[c.convert("RGB") if isinstance(c, Image.Image) else open_control(c) for c in row] for row in cells]


def rollout_conditioning(
    qwen: QwenImage,
    prompts: list[str],
    columns: dict[str, list] | None = None,
    true_cfg_scale: float = 1.0,
    negative_prompt: str | None = " ",
    reference_area: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[Conditioning, Conditioning | None]:
    """(positive, negative or None) for a batch of prompt rows: the prompts alone (text-to-image) or, for an edit
    model, the edit-template embeddings that read each row's control images plus their VAE tokens
    (``reference_area``: None = the model's, as at inference). The CFG negative reads the same images and shares
    the positive's reference tokens, as in ``QwenImageEditPlusPipeline``."""
    images = control_images(qwen, columns, len(prompts))
    cond = qwen.conditioning(prompts, images, reference_area=reference_area).to(device)
    negative = None
    if true_cfg_scale > 1 and negative_prompt is not None:
        negative = qwen.conditioning([negative_prompt] * len(prompts), images, references=False,
                                    reference_area=reference_area).to(device)
    return cond, negative


@torch.no_grad()
def generate_rollouts(
    qwen: QwenImage,
    transformer: torch.nn.Module,
    prompts: list[str],
    columns: dict[str, list] | None = None,
    *,
    height: int,
    width: int,
    num_inference_steps: int = 10,
    noise_level: float = 0.7,
    sde_window: tuple[int, int] | None = None,
    true_cfg_scale: float = 1.0,
    negative_prompt: str | None = " ",
    seeds: Sequence[int],
    generator: torch.Generator | None = None,
    decode: bool = True,
    keep_means: bool = False,
    reference_area: int | None = None,
) -> RolloutBatch:
    """Sample ``prompts`` with the SDE (on ``sde_window`` steps, all when None) and record the trajectory.

    Edit models read each row's control images from ``columns["control_images"]`` (:func:`rollout_conditioning`).

    ``transformer`` is the (unwrapped) policy; ``seeds`` give each sample's initial noise and, without
    ``generator``, its SDE noise too (a sample's trajectory then depends on its seed only, not on the batch it
    was drawn in). With ``decode`` the final latents are decoded to PIL images for the rewards; ``keep_means``
    stores every step's mean (fp32, for the stabilised losses that compare the policy's step with the rollout's).
    """
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for GRPO rollouts (0 is the deterministic ODE), got {noise_level}")
    qwen.check_size(height, width)
    device = next(transformer.parameters()).device
    cond, negative = rollout_conditioning(qwen, prompts, columns, true_cfg_scale, negative_prompt, reference_area, device)
    latents = qwen.initial_noise(len(prompts), height, width, list(seeds)).to(device)
    if generator is None:
        generator = sde_noise_generators(seeds)
    sigmas = qwen.inference_sigmas(num_inference_steps, height, width)
    # The bundle's velocity call without 2.1's condition KV cache: training recomputes log-probs with full forwards.
    out = sample(transformer, latents, sigmas, cond, qwen.img_shapes(len(prompts), height, width), negative=negative,
                 true_cfg_scale=true_cfg_scale, noise_level=noise_level, sde_window=sde_window, generator=generator,
                 record=True, velocity_fn=qwen.predict_velocity)
    images = qwen.decode_latents(out.latents, height, width) if decode else []
    return RolloutBatch(
        prompts=list(prompts), columns={k: list(v) for k, v in (columns or {}).items()}, cond=cond, negative=negative,
        trajectory=torch.stack(out.trajectory, dim=1), log_probs=out.log_probs.float(), sigmas=out.sigmas,
        sde_steps=list(out.sde_steps), height=height, width=width, noise_level=noise_level,
        true_cfg_scale=true_cfg_scale if negative is not None else 1.0,
        sigma_max=float(sigmas[1]) if num_inference_steps > 1 else float(sigmas[0]), images=images,
        means=torch.stack(out.means, dim=1).float() if keep_means else None,
    )


def recompute_log_prob(
    transformer: torch.nn.Module,
    batch: RolloutBatch,
    step_index: int,
    attention_kwargs: dict | None = None,
    velocity_fn: Callable = predict_velocity,
) -> SDEStep:
    """Score the stored transition x_j -> x_{j+1} under ``transformer`` (grad flows through the conditional branch).
    ``velocity_fn``: the bundle's ``predict_velocity`` (the model family's velocity call).

    Returns the SDEStep: ``log_prob`` (B,), ``mean`` (B, L, C) fp32 and ``std`` (the per-element std).
    """
    j = step_index
    if j not in batch.sde_steps:
        raise ValueError(f"step {j} was an ODE step in this rollout (SDE steps: {batch.sde_steps}); it has no log-prob.")
    x = batch.x(j)
    v = velocity_fn(transformer, x, batch.sigmas[j], batch.cond, batch.img_shapes, batch.negative,
                    batch.true_cfg_scale, attention_kwargs)
    return sde_step(x, v, float(batch.sigmas[j]), float(batch.sigmas[j + 1]), batch.noise_level, batch.sigma_max,
                    prev_sample=batch.x(j + 1))


RewardCall = Callable[..., list]


def score_images(
    reward_fn: RewardCall, prompts: list[str], images: list[Image.Image], columns: dict[str, list] | None = None
) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """Run a reward (or a ``rewards.CombinedReward``) -> (totals, per-reward lists for logging). NaN becomes None;
    a reward returning anything but one number (or None) per image is a UserError naming it."""
    from rewards import reward_name

    from .rewards import check_reward_values

    columns = columns or {}
    if hasattr(reward_fn, "compute"):
        res = reward_fn.compute(prompts, images, **columns)
        total, per = list(res.total), {k: list(v) for k, v in res.per_reward.items()}
        name = getattr(reward_fn, "reward_name", "combined")
    else:
        name = reward_name(reward_fn)
        total = check_reward_values(name, reward_fn(prompts, images, **columns), len(prompts))
        per = {name: list(total)}
    return check_reward_values(name, total, len(prompts)), per
