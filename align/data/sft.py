"""SFT training data, T2I and edit: load (imagefolder / datasets) -> rater filter -> row checks -> cache text
embeddings + VAE latents per training resolution (aspect-ratio buckets, optional flipped copies) -> bucket pools,
optionally split by source for a progressive phase schedule. The trainer (``align.trainers.sft``) only batches them.

Edit models (``QwenImage.edit_model``: an Edit pipeline in the checkpoint's model_index.json with a processor/, or
``tiny_variant: edit-2509 | edit-2511``) read the instruction / target / control-image rows of :mod:`align.data.edit`
through the same rater filter and row checks, pooled in buckets of equal target and reference sizes; their batches
carry ``references``, which the velocity call passes through the conditioning seam
(``qwen_image.sampling.Conditioning``), so the loss is the same flow-matching loss on the target tokens.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from datasets import Dataset, concatenate_datasets

from qwen_image import QwenImage
from qwen_image.errors import UserError

from ..configs.sft import SFTConfig
from ..modeling import model_identity
from .buckets import BucketSizeFn
from .edit import check_no_control_columns, control_problem, edit_pools, encode_edit_dataset, load_edit_dataset
from .encoding import encode_dataset, tensor_format
from .loading import load_image_dataset, validate_rows
from .ratings import filter_by_ratings
from .report import RowReport

logger = logging.getLogger(__name__)
# The empty caption trained under caption dropout: the pipeline's usual negative prompt, so CFG sees what it learnt.
EMPTY_PROMPT = " "


@dataclass
class SFTData:
    dataset: Dataset  # cached rows: prompt_embeds, <image>_latents, height, width, + metadata columns
    pools: dict  # (resolution, source) -> (height, width) -> units (lists of interchangeable row indices)
    summary: RowReport
    empty_prompt: torch.Tensor | None  # (L, D) embedding of EMPTY_PROMPT for caption dropout
    edit: bool = False  # rows carry reference latents (edit models): batches get ``references``


def _is_synthetic(value, synthetic_values: Sequence[str]) -> bool:
    return str(value) in set(synthetic_values)


def load_sft_rows(config: SFTConfig) -> tuple[Dataset, RowReport]:
    """Load, rater-filter and check the training rows (no model needed: data mistakes surface before it loads)."""
    raw = load_image_dataset(config.dataset_name, config.dataset_split, config.image_column)
    check_no_control_columns(raw.column_names, config.dataset_name)
    raw, rated = filter_by_ratings(raw, config.min_score, config.min_raters, config.rating_aggregate,
                                   config.rating_scale, config.ratings_column, config.skip_bad_rows)
    if len(raw) == 0:  # every row filtered out by the ratings: say so before the row checks touch the images
        raise UserError(f"no training rows left ({_dropped(rated)}); lower min_score/min_raters or fix the ratings")
    raw, checked = validate_rows(raw, [config.image_column], config.prompt_column, config.skip_bad_rows)
    summary = rated.merge(checked)
    if len(raw) == 0:
        raise UserError(f"no training rows left ({_dropped(summary)}); fix the data or the filter settings")
    return raw, summary


def _dropped(summary: RowReport) -> str:
    reasons = summary.dropped_text() or "none dropped"
    return f"{summary.total} rows, {reasons}" + (f"; filter: {summary.settings}" if summary.settings else "")


def prepare_sft_data(config: SFTConfig, qwen: QwenImage, rows: tuple[Dataset, RowReport] | None = None) -> SFTData:
    """Load (unless ``rows`` from :func:`load_sft_rows` are given), filter, check and cache the training data (the
    text encoder and VAE must still be loaded). Edit models read instruction / target / control-image rows."""
    if qwen.edit_model:
        return prepare_edit_sft_data(config, qwen)
    raw, summary = rows if rows is not None else load_sft_rows(config)
    if any(p.synthetic_fraction is not None for p in config.phase_list) and config.source_column not in raw.column_names:
        raise UserError(f"phases set synthetic_fraction but the dataset has no {config.source_column!r} column.")

    n = len(raw)
    raw = raw.add_column("unit", list(range(n)))
    flip_column = None
    if config.random_flip:
        flip_column = "flip"
        raw = concatenate_datasets([raw.add_column("flip", [False] * n), raw.add_column("flip", [True] * n)])

    resolutions = sorted({p.resolution for p in config.phase_list}) or [config.resolution]
    parts = []
    for res in resolutions:
        size_fn = (BucketSizeFn(res, config.bucket_aspect_ratios, qwen.size_multiple)
                   if config.aspect_ratio_buckets else None)
        parts.append(encode_dataset(raw, qwen, model_identity(config), config.encoding_cache_dir,
                                    image_columns=[config.image_column], prompt_column=config.prompt_column,
                                    resolution=res, size_fn=size_fn, flip_column=flip_column,
                                    batch_size=config.encode_batch_size))

    pools: dict = {}
    # The first pool sets the epoch length: the run's first phase (or the only resolution).
    first_res = config.phase_list[0].resolution if config.phase_list else config.resolution
    offset = 0
    for res, part in sorted(zip(resolutions, parts), key=lambda rp: rp[0] != first_res):
        cols = ["height", "width", "unit"] + ([config.source_column] if config.source_column in part.column_names else [])
        meta = part.select_columns(cols).with_format(None).to_dict()
        units: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for i in range(len(part)):
            bucket = (int(meta["height"][i]), int(meta["width"][i]))
            sources = ["all"]
            if config.source_column in meta:
                sources.append("synthetic" if _is_synthetic(meta[config.source_column][i], config.synthetic_values) else "real")
            for src in sources:
                units[src][bucket][meta["unit"][i]].append(offset + i)
        for src in units:
            pools[(res, src)] = {b: list(u.values()) for b, u in units[src].items()}
        offset += len(part)
    for i, p in enumerate(config.phase_list):
        if p.synthetic_fraction and (p.resolution, "synthetic") not in pools:
            raise UserError(f"phase {i} asks for synthetic_fraction {p.synthetic_fraction:g} but no row has "
                             f"{config.source_column} in {config.synthetic_values}.")
        if p.synthetic_fraction is not None and p.synthetic_fraction < 1 and (p.resolution, "real") not in pools:
            raise UserError(f"phase {i} asks for real rows but every row is synthetic.")

    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    latent = f"{config.image_column}_latents"
    dataset = tensor_format(dataset, [latent])

    empty = None
    if config.caption_dropout > 0:
        with torch.no_grad():
            embeds, mask = qwen.encode_prompt([EMPTY_PROMPT])
        empty = embeds[0, : int(mask[0].sum())].float().cpu()
    return SFTData(dataset, pools, summary, empty)


def check_edit_config(config: SFTConfig) -> None:
    """Options T2I SFT has that edit SFT does not support yet: a clear error instead of a silent difference."""
    unsupported = {
        "caption_dropout": config.caption_dropout > 0,  # the empty instruction still reads the images: per-row cache
        "random_flip": config.random_flip,  # mirrored text is not an edit the model should learn
        "phases": bool(config.phase_list),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise UserError(f"edit SFT does not support {', '.join(bad)} yet; unset {'it' if len(bad) == 1 else 'them'} "
                         "for an edit checkpoint.")


def prepare_edit_sft_data(config: SFTConfig, qwen: QwenImage) -> SFTData:
    """Load, filter, check and cache edit rows (text encoder, processor and VAE still loaded)."""
    check_edit_config(config)
    raw = load_edit_dataset(config.dataset_name, config.dataset_split, config.image_column,
                            config.control_columns, config.control_images_column)
    raw, rated = filter_by_ratings(raw, config.min_score, config.min_raters, config.rating_aggregate,
                                   config.rating_scale, config.ratings_column, config.skip_bad_rows)
    raw, checked = validate_rows(raw, [config.image_column], config.prompt_column, config.skip_bad_rows,
                                 extra_check=lambda row: control_problem(row, config.num_control_images))
    summary = rated.merge(checked)
    if len(raw) == 0:
        raise UserError(f"no training rows left after filtering.\n{summary}")
    size_fn = (BucketSizeFn(config.resolution, config.bucket_aspect_ratios, qwen.size_multiple)
               if config.aspect_ratio_buckets else None)
    encoded = encode_edit_dataset(raw, qwen, model_identity(config), config.encoding_cache_dir,
                                  image_columns=[config.image_column], prompt_column=config.prompt_column,
                                  resolution=config.resolution, size_fn=size_fn,
                                  control_resolution=config.control_resolution, batch_size=config.encode_batch_size)
    return SFTData(encoded, edit_pools(encoded, config.resolution), summary, None, edit=True)


def write_data_summary(config: SFTConfig, summary: RowReport, is_main: bool) -> None:
    """Print the kept/dropped summary and keep it next to the run (``data_summary.json``)."""
    logger.info("%s", summary)
    if not is_main:
        return
    print(summary, flush=True)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    Path(config.output_dir, "data_summary.json").write_text(json.dumps(
        {**summary.to_dict(), "world_size": config.world_size}, indent=2))
