"""Diffusion-KTO training data from per-image ratings, T2I and edit: read rated rows (a rating project's pull, or any
imagefolder / dataset with a ratings list per image) -> label each image desirable / undesirable from its raters
-> check the rows -> cache prompt embeddings + latents -> optional held-out split per class.

Labels, per row, in order (the rater filter of :mod:`align.data.ratings`, with two thresholds instead of one):
  1. a rating that is not a number or lies outside ``rating_scale`` -> an error naming the row (``skip_bad_rows``:
     dropped and counted ``bad_ratings``);
  2. fewer than ``min_raters`` ratings -> dropped ``too_few_ratings``;
  3. aggregate (mean / min / median) >= ``desirable_threshold`` -> desirable; <= ``undesirable_threshold`` ->
     undesirable; in between -> dropped ``middle_band`` (the raters did not say "this" or "not this").
Everything is read and checked before any weights load: a pull of a pair project, no ratings at all, a pull with
fewer raters than ``min_raters``, every row in the middle band or only one class are one-line errors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from qwen_image.errors import UserError

from ..configs.kto import RatingLabelArguments
from ..modeling import model_identity, uses_edit_model
from .edit import CONTROLS, control_problem, encode_edit_dataset, load_edit_dataset
from .encoding import encode_dataset
from .loading import load_image_dataset, validate_rows, write_synthetic_folder
from .ratings import _TOLERANCE, aggregate, describe_row, raise_bad_rows, read_ratings
from .report import RowReport

logger = logging.getLogger(__name__)

LABEL_COLUMN = "desirable"  # bool per row: the KTO label
SCORE_COLUMN = "rating"  # the aggregate rating the label came from
PULL_SUMMARY = "summary.json"  # written by ``qwen-image-annotation pull`` next to metadata.jsonl


def _pull_summary(dataset_name: str) -> dict | None:
    """The annotation pull's summary when ``dataset_name`` is a pull folder (or its ``hf/`` subfolder)."""
    path = Path(dataset_name).expanduser()
    for folder in (path, path.parent):
        summary = folder / PULL_SUMMARY
        if folder.is_dir() and summary.is_file():
            try:
                return json.loads(summary.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
    return None


def check_pull(dataset_name: str, min_raters: int) -> None:
    """A pull of a pair project is not a rating project; a pull whose raters are fewer than ``min_raters`` can
    label nothing. Both are said here, before the rows are read."""
    summary = _pull_summary(dataset_name)
    if not summary:
        return
    kind = str(summary.get("kind", ""))
    if kind and not kind.endswith("ratings"):
        raise UserError(f"{dataset_name} is the pull of a {kind!r} project, not a rating project: KTO learns from "
                        f"per-image ratings (pairs train with qwen-image-align dpo)")
    raters = summary.get("votes_per_rater")
    if isinstance(raters, dict) and raters and len(raters) < min_raters:
        raise UserError(f"{dataset_name}: the rating project was rated by {len(raters)} rater(s) but min_raters is "
                        f"{min_raters}; wait for more raters or lower min_raters")


def label_by_ratings(dataset: Dataset, args: RatingLabelArguments) -> tuple[Dataset, RowReport]:
    """The rows that get a label (module docstring), with a bool :data:`LABEL_COLUMN` and the aggregate
    :data:`SCORE_COLUMN`, and the report of the rows dropped."""
    column = args.ratings_column
    if column not in dataset.column_names:
        if {"chosen", "rejected"} <= set(dataset.column_names):
            raise UserError(f"the dataset holds preference pairs (chosen / rejected), not rated images: KTO needs "
                            f"a {column!r} list per image (a rating project's pull); pairs train with "
                            f"qwen-image-align dpo")
        raise UserError(f"the dataset has no {column!r} column (columns: {dataset.column_names}): KTO needs each "
                        f"image's ratings (a rating project's pull), or set ratings_column")
    scale = (float(args.rating_scale[0]), float(args.rating_scale[1]))
    how, high, low = args.rating_aggregate, args.desirable_threshold, args.undesirable_threshold
    report = RowReport(what="rated images", total=len(dataset))
    names = [c for c in ("file_name", "id", "candidate_id") if c in dataset.column_names]
    ids = {c: dataset[c] for c in names}
    keep, labels, scores, bad = [], [], [], []
    most_raters = 0
    for i, raw in enumerate(dataset[column]):
        label = describe_row(i, {c: ids[c][i] for c in names})
        ratings, problem = read_ratings(raw, scale)
        most_raters = max(most_raters, len(ratings))
        if problem:
            bad.append(f"{label}: {problem}")
            report.drop(i, f"bad_ratings: {problem}", label)
        elif len(ratings) < args.min_raters:
            report.drop(i, f"too_few_ratings: {len(ratings)} < {args.min_raters}", label)
        else:
            score = aggregate(ratings, how)
            if score >= high - _TOLERANCE or score <= low + _TOLERANCE:
                keep.append(i)
                labels.append(bool(score >= high - _TOLERANCE))
                scores.append(float(score))
                report.keep(i)
            else:
                report.drop(i, f"middle_band: {how} {score:.3g} between {low:g} and {high:g}", label)
    if bad and not args.skip_bad_rows:
        raise_bad_rows(bad, "row(s) with bad ratings", hint="Ratings must be numbers on the rating scale; fix the "
                                                          "data, set rating_scale, or pass --skip_bad_rows to skip them.")
    n_good = sum(labels)
    report.settings = (f"desirable: {how} >= {high:g} ({n_good}), undesirable: {how} <= {low:g} "
                       f"({len(labels) - n_good}), >= {args.min_raters} raters on [{scale[0]:g}, {scale[1]:g}]")
    if not keep:
        if report.dropped.get("too_few_ratings") == report.total:
            raise UserError(f"no image has {args.min_raters} ratings (at most {most_raters} per image): the project "
                            f"needs more raters, or lower min_raters")
        if report.dropped.get("middle_band") and report.dropped["middle_band"] == report.total - len(bad):
            raise UserError(f"all {report.dropped['middle_band']} rated images fall between the thresholds "
                            f"({how} between {low:g} and {high:g}): nothing is desirable or undesirable; lower "
                            f"desirable_threshold or raise undesirable_threshold")
        raise UserError(f"no labelled images: {report.summary()}")
    if n_good == 0 or n_good == len(labels):
        which, other = ("desirable", "undesirable") if n_good else ("undesirable", "desirable")
        raise UserError(f"only {which} images ({len(labels)}; {report.dropped_text() or 'none dropped'}): KTO needs "
                        f"{other} ones too; adjust desirable_threshold / undesirable_threshold or rate more images")
    out = dataset.select(keep) if len(keep) < len(dataset) else dataset
    return out.add_column(LABEL_COLUMN, labels).add_column(SCORE_COLUMN, scores), report


def load_kto_rows(config: Any, dataset_name: str | None = None) -> tuple[Dataset, RowReport]:
    """Read, label and check the rated rows of ``dataset_name`` (default ``config.dataset_name``; edit models: with
    their control images). No model needed."""
    name = dataset_name or config.dataset_name
    check_pull(name, config.min_raters)
    edit = uses_edit_model(config)
    if edit:
        raw = load_edit_dataset(name, config.dataset_split, config.image_column, config.control_columns,
                                config.control_images_column)
    else:
        raw = load_image_dataset(name, config.dataset_split, config.image_column)
    if config.prompt_column != "prompt" and config.prompt_column in raw.column_names:
        raw = raw.rename_column(config.prompt_column, "prompt")
    labelled, labels = label_by_ratings(raw, config)
    extra = (lambda row: control_problem(row, config.num_control_images)) if edit else None
    checked_rows, checked = validate_rows(labelled, [config.image_column], "prompt", config.skip_bad_rows,
                                          extra_check=extra)
    report = labels.merge(checked)
    flags = checked_rows[LABEL_COLUMN]
    if not flags:
        raise UserError(f"no rated images left after the row checks ({report.dropped_text()})")
    if all(flags) or not any(flags):
        raise UserError(f"only {'desirable' if flags and flags[0] else 'undesirable'} images are left after the "
                        f"row checks ({report.dropped_text()}): KTO needs both")
    keep = ["prompt", config.image_column, LABEL_COLUMN, SCORE_COLUMN] + ([CONTROLS] if edit else [])
    rows = checked_rows.select_columns(keep)
    logger.info("%s", report)
    return rows, report


def encode_kto_rows(config: Any, qwen, rows: Dataset) -> Dataset:
    """Prompt embeddings + latents of every labelled image (cached on disk like the DPO pairs)."""
    common = dict(image_columns=[config.image_column], prompt_column="prompt", resolution=config.resolution,
                  batch_size=config.encode_batch_size)
    if qwen.edit_model:
        return encode_edit_dataset(rows, qwen, model_identity(config), config.encoding_cache_dir,
                                   control_resolution=config.control_resolution, **common)
    return encode_dataset(rows, qwen, model_identity(config), config.encoding_cache_dir, **common)


def split_by_class(encoded: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``eval_fraction`` of each class (at least one of each when > 0); the held-out rows are shuffled so
    every evaluation batch mixes both classes."""
    if eval_fraction <= 0:
        return encoded, None
    labels = np.asarray(encoded.with_format(None)[LABEL_COLUMN], dtype=bool)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for value in (True, False):
        idx = rng.permutation(np.flatnonzero(labels == value))
        n = min(len(idx) - 1, max(1, round(eval_fraction * len(idx))))
        held += idx[:n].tolist()
    held_set = set(held)
    train = [i for i in range(len(encoded)) if i not in held_set]
    if not train:
        raise UserError(f"eval_fraction {eval_fraction:g} leaves no training rows")
    return encoded.select(train), encoded.select(rng.permutation(held).tolist())


def build_kto_datasets(config: Any, qwen, rows: Dataset | None = None) -> tuple[Dataset, Dataset | None]:
    """Labelled rows (read here unless given) -> encoded (rank 0 first, the others reuse its cache) -> split."""
    if rows is None:
        rows, _ = load_kto_rows(config)
    with config.main_process_first(desc="rated images"):
        encoded = encode_kto_rows(config, qwen, rows)
    return split_by_class(encoded, config.eval_fraction, config.seed)


def write_summary(config: Any, report: RowReport, is_main: bool) -> None:
    """Print what was labelled and dropped, and keep it next to the run (``data_summary.json``)."""
    if not is_main:
        return
    print(report, flush=True)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    Path(config.output_dir, "data_summary.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))


# ------------------------------------------------------------------------------------------------ synthetic data
def write_synthetic_ratings(folder: str | Path, n: int = 24, size: int = 32, seed: int = 0, edit: bool = False,
                            middle_every: int = 6) -> Path:
    """Demo/test rated renders, in the layout of a rating project's pull (``metadata.jsonl``: ``file_name, prompt,
    ratings``; edit: ``control_image`` too): desirable images are bright (three raters: 4-5), undesirable ones dark
    (1-2), the same random textures otherwise; every ``middle_every``-th image is mid-grey, rated 3 (the middle
    band: dropped). A KTO run on it must learn to tell bright from dark (held-out implicit accuracy)."""
    rng = np.random.default_rng(seed)

    def items():
        for i in range(n):
            texture = rng.integers(0, 30, (size, size, 3)) + rng.integers(0, 10, 3)
            if middle_every and i % middle_every == middle_every - 1:
                offset, ratings = 90, [3, 3, 4]
            elif (i - i // middle_every if middle_every else i) % 2 == 0:  # the two classes alternate: balanced
                offset, ratings = 170, [5, 5, 4] if i % 4 else [5, 5, 5]
            else:
                offset, ratings = 10, [1, 2, 1] if i % 4 == 1 else [2, 1, 1]
            images = {f"img{i}.png": texture + offset}
            row = {"file_name": f"img{i}.png", "prompt": f"a photo number {i % 7}", "ratings": ratings}
            if edit:
                images[f"src{i}.png"] = texture + 90
                row.update(prompt=f"make photo {i % 7} brighter", control_image=f"src{i}.png")
            yield row, images

    return write_synthetic_folder(folder, items())
