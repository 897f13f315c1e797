"""Diffusion-KTO options: how per-image ratings become desirable / undesirable labels (:class:`RatingLabelArguments`,
shared with the combined objective's KTO term) and the KTO loss settings (TRL's KTO names where they exist:
``beta``, ``desirable_weight``, ``undesirable_weight``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_image.errors import UserError

from ..losses.kto import KTO_BETA
from .base import EncodingArguments, QwenImageTrainingConfig, TimestepArguments
from .sft import AGGREGATES

# How the reference point z of the KTO loss is estimated (align/trainers/kto.py):
#   batch       max(0, mean over the batch of the implicit reward), detached, averaged over processes (the paper's)
#   mismatched  the same mean on prompt/image pairs shifted by one inside the batch (TRL's KL estimate)
#   none        z = 0
KL_ESTIMATES = ("batch", "mismatched", "none")


@dataclass
class RatingLabelArguments:
    """Per-image ratings -> labels: rows whose aggregate rating is >= ``desirable_threshold`` are desirable, rows
    <= ``undesirable_threshold`` undesirable, the band between them is dropped (and counted)."""

    image_column: str = field(default="image", metadata={"help": "Image column of the rated dataset."})
    ratings_column: str = field(default="ratings", metadata={"help": "Column with each image's list of ratings (what a rating project's pull writes)."})
    min_raters: int = field(default=3, metadata={"help": "Use images rated by at least this many raters (others are dropped and counted)."})
    rating_aggregate: str = field(default="mean", metadata={"help": "mean | min | median of an image's ratings."})
    rating_scale: list[float] = field(default_factory=lambda: [1.0, 5.0], metadata={"help": "Rating scale [low high]; a rating outside it is an error."})
    desirable_threshold: float = field(default=4.5, metadata={"help": "Aggregate rating at or above which an image is desirable."})
    undesirable_threshold: float = field(default=2.0, metadata={"help": "Aggregate rating at or below which an image is undesirable."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip (and count) rows with bad ratings or missing/unreadable images instead of failing."})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO lambda_D: weight of desirable images' losses."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO lambda_U: weight of undesirable images' losses."})
    kl_estimate: str = field(default="batch", metadata={"help": f"Reference point of the KTO loss, one of {KL_ESTIMATES}: batch (the paper's: mean implicit reward of the batch, detached, over all processes), mismatched (TRL's: on prompts shifted by one in the batch; one more forward of each model), none (0)."})

    def _validate_rating_labels(self) -> None:
        if self.rating_aggregate not in AGGREGATES:
            raise UserError(f"rating_aggregate must be one of {AGGREGATES}, got {self.rating_aggregate!r}")
        if len(self.rating_scale) != 2 or float(self.rating_scale[0]) >= float(self.rating_scale[1]):
            raise UserError(f"rating_scale must be two numbers [low, high] with low < high, got {list(self.rating_scale)}")
        low, high = float(self.rating_scale[0]), float(self.rating_scale[1])
        for name in ("desirable_threshold", "undesirable_threshold"):
            if not low <= getattr(self, name) <= high:
                raise UserError(f"{name} {getattr(self, name):g} is outside the rating scale [{low:g}, {high:g}]")
        if self.undesirable_threshold >= self.desirable_threshold:
            raise UserError(f"undesirable_threshold ({self.undesirable_threshold:g}) must be below "
                            f"desirable_threshold ({self.desirable_threshold:g})")
        if self.min_raters < 1:
            raise UserError(f"min_raters must be >= 1 for KTO (labels come from ratings), got {self.min_raters}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0 or self.desirable_weight + self.undesirable_weight == 0:
            raise UserError(f"desirable_weight and undesirable_weight must be >= 0 and not both 0, got "
                            f"{self.desirable_weight:g}, {self.undesirable_weight:g}")
        if self.kl_estimate not in KL_ESTIMATES:
            raise UserError(f"kl_estimate must be one of {KL_ESTIMATES}, got {self.kl_estimate!r}")


@dataclass
class KTOConfig(RatingLabelArguments, TimestepArguments, EncodingArguments, QwenImageTrainingConfig):
    """Diffusion-KTO on rated images: ``dataset_name`` is a rating project's pull (or any imagefolder / dataset
    with a ratings list per image)."""

    beta: float = field(
        default=KTO_BETA,
        metadata={"help": "KTO temperature on the implicit reward (errors are means over latent dims). The paper's "
                          "default is 1000 (on SD's eps errors); velocity errors are of a similar scale."},
    )
    shared_noise: bool = field(default=False, metadata={"help": "Train every image of a batch at the same noise and sigma (the paper: one draw per image). Shared draws cancel the draw's share of the implicit reward between the images of a batch: less gradient noise when desirable and undesirable images differ subtly."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Hold out this fraction of each class to report the held-out implicit accuracy."})
    eval_noise_draws: int = field(default=4, metadata={"help": "Held-out implicit rewards: mean over this many (noise, sigma) draws, the same draws for every held-out image."})
    reference_offload: bool = field(default=False, metadata={"help": "Full fine-tune: keep the frozen copy on CPU between uses (single process / DDP)."})

    def __post_init__(self):
        super().__post_init__()
        self._validate_rating_labels()
        if not self.dataset_name:
            raise UserError("dataset_name is required: a rating project's pull (or an imagefolder with a ratings list per image).")
        if self.beta <= 0:
            raise UserError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_noise_draws < 1:
            raise UserError(f"eval_noise_draws must be >= 1, got {self.eval_noise_draws}")
        if self.kl_estimate == "mismatched" and self.per_device_train_batch_size < 2:
            raise UserError("kl_estimate mismatched pairs each image with another row's prompt: per_device_train_batch_size must be >= 2")
