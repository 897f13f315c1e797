"""Edit SFT data (Qwen-Image-Edit-2509 / 2511): the edit rows of :mod:`align.data.edit` through the same rater
filter and row checks as T2I SFT, cached, and pooled in buckets of equal target and reference sizes.

The SFT trainer itself is shared: its batches carry ``references`` and the velocity call passes them through the
conditioning seam (``qwen_image.sampling.Conditioning``), so the loss is the same flow-matching loss on the target
tokens. Selected when the model is an edit model (``QwenImage.edit_model``: an Edit pipeline in the checkpoint's
model_index.json with a processor/, or ``tiny_variant: edit-2509 | edit-2511``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwen_image import QwenImage

from ..data.buckets import BucketSizeFn
from ..data.edit import control_problem, edit_pools, encode_edit_dataset, load_edit_dataset
from ..data.loading import validate_rows
from ..data.ratings import filter_by_ratings
from ..modeling import model_identity

if TYPE_CHECKING:
    from ..configs.sft import SFTConfig
    from .sft import SFTData


def check_edit_config(config: "SFTConfig") -> None:
    """Options T2I SFT has that edit SFT does not support yet: a clear error instead of a silent difference."""
    unsupported = {
        "caption_dropout": config.caption_dropout > 0,  # the empty instruction still reads the images: per-row cache
        "random_flip": config.random_flip,  # mirrored text is not an edit the model should learn
        "phases": bool(config.phase_list),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"edit SFT does not support {', '.join(bad)} yet; unset {'it' if len(bad) == 1 else 'them'} "
                         "for an edit checkpoint.")


def prepare_edit_sft_data(config: "SFTConfig", qwen: QwenImage) -> "SFTData":
    """Load, filter, check and cache edit rows (text encoder, processor and VAE still loaded)."""
    from .sft import SFTData

    check_edit_config(config)
    raw = load_edit_dataset(config.dataset_name, config.dataset_split, config.image_column,
                            config.control_columns, config.control_images_column)
    raw, rated = filter_by_ratings(raw, config.min_score, config.min_raters, config.rating_aggregate,
                                   config.rating_scale, config.ratings_column, config.skip_bad_rows)
    raw, checked = validate_rows(raw, [config.image_column], config.prompt_column, config.skip_bad_rows,
                                 extra_check=lambda row: control_problem(row, config.num_control_images))
    summary = rated.merge(checked)
    if len(raw) == 0:
        raise ValueError(f"no training rows left after filtering.\n{summary}")
    size_fn = BucketSizeFn(config.resolution, config.bucket_aspect_ratios) if config.aspect_ratio_buckets else None
    encoded = encode_edit_dataset(raw, qwen, model_identity(config), config.encoding_cache_dir,
                                  image_columns=[config.image_column], prompt_column=config.prompt_column,
                                  resolution=config.resolution, size_fn=size_fn,
                                  control_resolution=config.control_resolution, batch_size=config.encode_batch_size)
    return SFTData(encoded, edit_pools(encoded, config.resolution), summary, None, edit=True)
