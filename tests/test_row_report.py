"""One kept/dropped report (align/data/report.py) for the rater filter, the row checks, the preference checks and
the data tools' filters: counts, every reason of each dropped row, the one-line summary, to_dict."""

import json

import numpy as np
from datasets import Dataset
from PIL import Image

from align.data.loading import validate_rows
from align.data.preference import load_preference_dataset, write_synthetic_pairs
from align.data.ratings import filter_by_ratings
from align.data.report import RowReport
from align.datatools import ResolutionFilter, filter_dataset


def test_chained_passes_map_dropped_rows_back_to_the_input(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rows = Dataset.from_dict({"file_name": [f"{i}.png" for i in range(4)],
                              "image": [str(tmp_path / f"{i}.png") for i in range(4)],
                              "prompt": ["a", "b", "", "d"], "ratings": [[5, 5, 5], [2, 2, 2], [5, 5, 5], [5, 5, 5]]})
    rated_rows, rated = filter_by_ratings(rows, min_score=4.5, min_raters=3)
    checked_rows, checked = validate_rows(rated_rows, ["image"], "prompt", skip_bad_rows=True)
    report = rated.merge(checked)
    assert isinstance(report, RowReport) and (report.total, report.kept) == (4, 2)
    # row 2 of the input is row 1 of the rated rows: the merged report names it by its input index
    assert report.dropped_indices == [1, 2]
    assert report.reasons[1] == ["low_score: mean 2 < 4.5"]
    assert report.reasons[2][0].startswith("empty_prompt: ")
    assert report.dropped == {"low_score": 1, "empty_prompt": 1} and report.kept_indices == [0, 3]
    assert report.summary() == ("data: kept 2/4 (50.0%); dropped: 1 empty_prompt, 1 low_score; "
                                "mean of >= 3 ratings >= 4.5 on [1, 5]; rows checked")
    saved = json.loads(json.dumps(report.to_dict()))
    assert saved["kept"] == 2 and saved["dropped_indices"] == [1, 2] and saved["reasons"]["1"] == report.reasons[1]


def test_every_pass_returns_the_same_report(tmp_path):
    folder = write_synthetic_pairs(tmp_path / "pairs", n=2, size=16)
    with open(folder / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt": "tie", "chosen": "c0.png", "rejected": "r0.png", "votes": [1, 1]}) + "\n")
    _, pairs = load_preference_dataset(str(folder))
    assert isinstance(pairs, RowReport) and pairs.reasons == {2: ["tie"]}
    assert pairs.summary() == "preference pairs: kept 2/3 (66.7%); dropped: 1 tie"
    _, filtered = filter_dataset([{"image": Image.new("RGB", (8, 8))}, {"image": Image.new("RGB", (80, 80))}],
                                 [ResolutionFilter(min_side=64)], verbose=False)
    assert isinstance(filtered, RowReport) and filtered.kept_indices == [1] and list(filtered.reasons) == [0]
    assert filtered.summary().startswith("filter_dataset: kept 1/2 (50.0%); dropped: 1 resolution")


def test_counts_every_failed_check_and_dropped_each_row_once():
    report = RowReport(what="filter_dataset", total=3)
    report.drop(0, ["resolution: 8x8", "blur: variance 3 < 100"])
    report.drop(1, "blur: variance 9 < 100", row="row 1 (file_name='b.png')")
    report.keep(2)
    assert report.dropped == {"resolution": 1, "blur": 1} and report.counts == {"resolution": 1, "blur": 2}
    assert report.num_dropped == 2 and report.examples["blur"] == ["row 1 (file_name='b.png')"]
    assert str(report).splitlines()[1:] == ["  dropped 1 blur (2 rows failed it in all) (e.g. row 1 (file_name='b.png'))",
                                            "  dropped 1 resolution (e.g. row 0)"]
