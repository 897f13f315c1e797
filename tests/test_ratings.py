"""Rater filter: every rule and edge (raters, threshold, scale, aggregates, bad rows, missing column)."""

import math

import pytest
from datasets import Dataset

from align.data.ratings import aggregate, filter_by_ratings, read_ratings


def ds(ratings, **extra):
    rows = {"prompt": [f"p{i}" for i in range(len(ratings))], "file_name": [f"{i}.png" for i in range(len(ratings))],
            "ratings": ratings}
    rows.update(extra)
    return Dataset.from_dict(rows)


def kept_names(out):
    return out["file_name"]


def test_mean_exactly_at_threshold_is_kept_and_just_below_dropped():
    out, summary = filter_by_ratings(ds([[5, 4, 4.5], [5, 4, 4.49], [4.5, 4.5, 4.5]]))
    assert kept_names(out) == ["0.png", "2.png"]
    assert summary.kept == 2 and summary.total == 3 and summary.dropped == {"low_score": 1}
    assert summary.examples["low_score"] == ["row 1 (file_name='1.png')"]


def test_two_raters_are_too_few_even_with_perfect_scores():
    out, summary = filter_by_ratings(ds([[5, 5], [5, 5, 5], [], None]))
    assert kept_names(out) == ["1.png"]
    assert summary.dropped == {"too_few_ratings": 3}


def test_two_raters_enough_when_min_raters_is_two():
    out, _ = filter_by_ratings(ds([[5, 5], [5]]), min_raters=2)
    assert kept_names(out) == ["0.png"]


def test_none_entries_are_abstentions_not_ratings():
    out, summary = filter_by_ratings(ds([[5, None, 5], [5, 5, 5, None]]))
    assert kept_names(out) == ["1.png"]
    assert summary.dropped == {"too_few_ratings": 1}


@pytest.mark.parametrize("how, kept", [("mean", ["0.png", "1.png"]), ("min", ["1.png"]), ("median", ["0.png", "1.png", "2.png"])])
def test_aggregates(how, kept):
    # row0: mean 4.67, min 4, median 5 | row1: all 5 | row2: mean 3.67, min 1, median 5
    out, _ = filter_by_ratings(ds([[5, 5, 4], [5, 5, 5], [5, 5, 1]]), rating_aggregate=how)
    assert kept_names(out) == kept


def test_aggregate_values():
    assert aggregate([4, 5, 4.5]) == 4.5
    assert aggregate([1, 5, 4], "min") == 1.0
    assert aggregate([1, 5, 4, 2], "median") == 3.0
    with pytest.raises(ValueError, match="rating_aggregate"):
        aggregate([1], "max")


def test_out_of_scale_rating_names_the_row():
    with pytest.raises(ValueError, match=r"row 1 \(file_name='1.png'\): rating 6 is outside the rating scale \[1, 5\]"):
        filter_by_ratings(ds([[5, 5, 5], [5, 6, 5]]))
    with pytest.raises(ValueError, match=r"row 0 .*rating 0 is outside"):
        filter_by_ratings(ds([[0, 5, 5]]))


def test_skip_bad_rows_counts_instead_of_failing():
    out, summary = filter_by_ratings(ds([[5, 5, 5], [5, 6, 5], [5, 5, 5]]), skip_bad_rows=True)
    assert kept_names(out) == ["0.png", "2.png"]
    assert summary.dropped == {"bad_ratings": 1}
    assert "dropped 1 bad_ratings" in str(summary)


def test_declared_scale_changes_what_is_valid_and_the_threshold_must_lie_on_it():
    out, _ = filter_by_ratings(ds([[9, 10, 8], [3, 4, 2]]), rating_scale=[0, 10], min_score=7)
    assert kept_names(out) == ["0.png"]
    with pytest.raises(ValueError, match="outside the rating scale"):
        filter_by_ratings(ds([[5, 5, 5]]), rating_scale=[0, 10], min_score=11)
    with pytest.raises(ValueError, match="low < high"):
        filter_by_ratings(ds([[5, 5, 5]]), rating_scale=[5, 1])


def test_non_numeric_and_nan_ratings_are_bad_rows():
    with pytest.raises(ValueError, match="row 0 .*is not a number"):
        filter_by_ratings(ds([[5.0, math.nan, 5.0]]))
    assert read_ratings([5, "x", 5], (1, 5))[1] == "rating 'x' is not a number"
    assert read_ratings([True, 5, 5], (1, 5))[1] is not None  # a bool is not a rating
    assert read_ratings([{"rating": 4}, {"rating": 5}], (1, 5)) == ([4.0, 5.0], None)  # Label Studio-like dicts
    assert read_ratings(4, (1, 5)) == ([4.0], None)


def test_missing_ratings_column_is_a_clear_error_unless_the_filter_is_off():
    plain = Dataset.from_dict({"prompt": ["a", "b"], "file_name": ["a.png", "b.png"]})
    with pytest.raises(ValueError, match="no 'ratings' column.*min_raters 0"):
        filter_by_ratings(plain)
    out, summary = filter_by_ratings(plain, min_raters=0)
    assert len(out) == 2 and summary.settings == "no rating filter"


def test_other_column_name_and_summary_metrics():
    data = Dataset.from_dict({"prompt": ["a", "b"], "scores": [[5, 5, 5], [1, 2, 3]]})
    out, summary = filter_by_ratings(data, ratings_column="scores")
    assert out["prompt"] == ["a"]
    assert summary.metrics() == {"data/rows_total": 2.0, "data/rows_kept": 1.0, "data/dropped_low_score": 1.0}
    assert summary.examples["low_score"] == ["row 1"]
