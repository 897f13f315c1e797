"""SFT options: caption dropout, the rater filter, augmentation / bucketing and the progressive phase schedule, on
top of the shared groups (:class:`align.configs.base.QwenImageTrainingConfig`), the encoding cache and the
flow-matching loss's fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_image.errors import UserError

from .base import EncodingArguments, FlowMatchingArguments, QwenImageTrainingConfig
from .phases import parse_phases

# The option values SFT's data layer implements (align/data/buckets.py, align/data/ratings.py).
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
AGGREGATES = ("mean", "min", "median")


@dataclass
class SFTConfig(FlowMatchingArguments, EncodingArguments, QwenImageTrainingConfig):
    caption_dropout: float = field(default=0.0, metadata={"help": "Probability of training a sample on the empty prompt."})
    image_column: str = field(default="image", metadata={"help": "Image column of the dataset."})
    # --- rater filter
    ratings_column: str = field(default="ratings", metadata={"help": "Column with each row's list of ratings."})
    min_raters: int = field(default=3, metadata={"help": "Keep rows with at least this many ratings (0: no rating filter)."})
    min_score: float = field(default=4.5, metadata={"help": "Keep rows whose aggregate rating is >= this."})
    rating_aggregate: str = field(default="mean", metadata={"help": "mean | min | median of the ratings."})
    rating_scale: list[float] = field(default_factory=lambda: [1.0, 5.0], metadata={"help": "Rating scale [low high]; ratings outside are errors."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip (and count) rows with bad ratings, missing/unreadable images or empty prompts instead of failing."})
    # --- augmentation / batching
    aspect_ratio_buckets: bool = field(default=False, metadata={"help": "Encode each image at the bucket size nearest its aspect ratio."})
    bucket_aspect_ratios: list[float] = field(default_factory=lambda: list(DEFAULT_ASPECT_RATIOS), metadata={"help": "Bucket aspect ratios (width/height)."})
    random_flip: bool = field(default=False, metadata={"help": "Cache a mirrored copy of every image and train on either at random."})
    # --- progressive schedule
    phases: str | None = field(
        default=None,
        metadata={"help": "Progressive phases (YAML list, or JSON on the CLI): [{until: 0.5, resolution: 512, synthetic_fraction: 0.5, lr_scale: 1.0}, ...]"},
    )
    source_column: str = field(default="source", metadata={"help": "Column telling real from synthetic rows (for phase mixes)."})
    synthetic_values: list[str] = field(default_factory=lambda: ["synthetic"], metadata={"help": "source_column values that mean synthetic."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.caption_dropout < 1.0:
            raise UserError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.rating_aggregate not in AGGREGATES:
            raise UserError(f"rating_aggregate must be one of {AGGREGATES}, got {self.rating_aggregate!r}")
        if not self.dataset_name:
            raise UserError("dataset_name is required (an imagefolder with metadata.jsonl, or a datasets folder).")
        self.phase_list = parse_phases(self.phases, self.resolution)
        if self.phase_list and self.max_steps <= 0:
            raise UserError("phases need max_steps > 0 (phase boundaries are fractions of max_steps).")
