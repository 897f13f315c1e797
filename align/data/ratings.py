"""Rater filter: keep rows rated by enough raters whose aggregate score reaches a threshold (SFT data curation).

Rules, in order, per row:
  1. a rating that is not a number (or NaN), or lies outside the declared scale -> a *bad row* (error naming the
     row, or skipped and counted with ``skip_bad_rows``): it is a data bug, not a low score;
  2. fewer than ``min_raters`` ratings (``None`` entries = a rater who abstained) -> dropped ``too_few_ratings``;
  3. aggregate (mean / min / median) below ``min_score`` -> dropped ``low_score``.
A score exactly at the threshold is kept (compared with a 1e-9 tolerance so 13.5/3 style means do not flicker).
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any, Sequence

from datasets import Dataset

from qwen_image.errors import UserError

from ..configs.sft import AGGREGATES
from .report import RowReport

_TOLERANCE = 1e-9


def raise_bad_rows(problems: Sequence[str], what: str = "bad row(s)",
                   hint: str = "Fix the data or pass --skip_bad_rows to skip them.") -> None:
    """One-line error naming the first bad rows, and how to fix (or skip) them."""
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise UserError(f"{len(problems)} {what}: {'; '.join(problems[:3])}{more}. {hint}")


def describe_row(index: int, row: dict | None = None) -> str:
    """``row 3 (file_name='a.png')``: how every message names a row."""
    for key in ("file_name", "id", "image_path"):
        if row is not None and row.get(key) not in (None, ""):
            return f"row {index} ({key}={row[key]!r})"
    return f"row {index}"


def aggregate(ratings: Sequence[float], how: str = "mean") -> float:
    """Mean, min or median of a non-empty list of ratings."""
    if how not in AGGREGATES:
        raise UserError(f"rating_aggregate must be one of {AGGREGATES}, got {how!r}")
    if not ratings:
        raise UserError("cannot aggregate an empty list of ratings")
    if how == "mean":
        return math.fsum(ratings) / len(ratings)
    if how == "min":
        return float(min(ratings))
    return float(statistics.median(ratings))


def _as_number(value: Any) -> float | None:
    """A rating as float; accepts numbers and Label Studio-like dicts ``{"rating": 4}``. None -> not a number."""
    if isinstance(value, dict):
        value = next((value[k] for k in ("rating", "score", "value") if k in value), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_ratings(raw: Any, scale: tuple[float, float]) -> tuple[list[float], str | None]:
    """(ratings, problem): the numeric ratings of one row, or a description of why the row is bad."""
    if raw is None:
        return [], None
    if isinstance(raw, str):  # the loader keeps a ratings column with non-numbers as JSON text (one Arrow type)
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return [], f"ratings {raw!r} are not a list of numbers"
    if isinstance(raw, (int, float, dict)) and not isinstance(raw, bool):
        raw = [raw]  # a single rating is a list of one
    if not isinstance(raw, (list, tuple)):
        return [], f"ratings {raw!r} are not a list of numbers"
    lo, hi = scale
    out = []
    for value in raw:
        if value is None:  # a rater who did not rate this row
            continue
        number = _as_number(value)
        if number is None:
            return [], f"rating {value!r} is not a number"
        if not lo - _TOLERANCE <= number <= hi + _TOLERANCE:
            return [], f"rating {value!r} is outside the rating scale [{lo:g}, {hi:g}]"
        out.append(number)
    return out, None


def filter_by_ratings(
    dataset: Dataset,
    min_score: float = 4.5,
    min_raters: int = 3,
    rating_aggregate: str = "mean",
    rating_scale: Sequence[float] = (1.0, 5.0),
    ratings_column: str = "ratings",
    skip_bad_rows: bool = False,
) -> tuple[Dataset, RowReport]:
    """Rows with >= ``min_raters`` ratings whose aggregate is >= ``min_score``, plus a summary of the rest.

    ``min_raters=0`` turns the filter off (all rows kept; the column may then be absent). Bad rows (non-numeric or
    out-of-scale ratings) raise one ValueError listing them, unless ``skip_bad_rows``.
    """
    if rating_aggregate not in AGGREGATES:
        raise UserError(f"rating_aggregate must be one of {AGGREGATES}, got {rating_aggregate!r}")
    if len(rating_scale) != 2 or float(rating_scale[0]) >= float(rating_scale[1]):
        raise UserError(f"rating_scale must be two numbers [low, high] with low < high, got {list(rating_scale)}")
    scale = (float(rating_scale[0]), float(rating_scale[1]))
    if min_raters < 0:
        raise UserError(f"min_raters must be >= 0, got {min_raters}")
    if min_raters > 0 and not scale[0] <= min_score <= scale[1]:
        raise UserError(f"min_score {min_score:g} is outside the rating scale [{scale[0]:g}, {scale[1]:g}]")
    summary = RowReport(total=len(dataset))
    if min_raters == 0:
        summary.kept, summary.settings = len(dataset), "no rating filter"
        return dataset, summary
    if ratings_column not in dataset.column_names:
        raise UserError(
            f"the dataset has no {ratings_column!r} column (columns: {dataset.column_names}); "
            f"set ratings_column, or min_raters 0 to train on unrated data."
        )
    summary.settings = (f"{rating_aggregate} of >= {min_raters} ratings >= {min_score:g} "
                        f"on [{scale[0]:g}, {scale[1]:g}]")
    # Only the small columns are read: no image is decoded to filter.
    names = [c for c in ("file_name", "id") if c in dataset.column_names]
    ids = {c: dataset[c] for c in names}
    keep, bad = [], []
    for i, raw in enumerate(dataset[ratings_column]):
        label = describe_row(i, {c: ids[c][i] for c in names})
        ratings, problem = read_ratings(raw, scale)
        if problem:
            bad.append(f"{label}: {problem}")
            summary.drop(i, f"bad_ratings: {problem}", label)
        elif len(ratings) < min_raters:
            summary.drop(i, f"too_few_ratings: {len(ratings)} < {min_raters}", label)
        elif (score := aggregate(ratings, rating_aggregate)) < min_score - _TOLERANCE:
            summary.drop(i, f"low_score: {rating_aggregate} {score:.3g} < {min_score:g}", label)
        else:
            keep.append(i)
            summary.keep(i)
    if bad and not skip_bad_rows:
        raise_bad_rows(bad, "row(s) with bad ratings")
    return (dataset if len(keep) == len(dataset) else dataset.select(keep)), summary
