"""Preference pairs: loading from metadata.jsonl / save_to_disk, and counted skips for rows that cannot train."""

import json

import pytest
from datasets import Dataset, Image
from PIL import Image as PILImage

from align.data.preference import load_preference_dataset, vote_counts, write_synthetic_pairs


def _append(folder, rows):
    with open(folder / "metadata.jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def test_validation_drops_and_counts_bad_rows(tmp_path):
    folder = write_synthetic_pairs(tmp_path / "pairs", n=4, size=16)
    (folder / "broken.png").write_bytes(b"not a png")
    PILImage.open(folder / "c0.png").save(folder / "c0_copy.png")  # same pixels, another file
    _append(folder, [
        {"prompt": "same", "chosen": "c0.png", "rejected": "c0_copy.png"},
        {"prompt": "tie", "chosen": "c1.png", "rejected": "r1.png", "votes": [1, 1]},
        {"prompt": "tie labels", "chosen": "c1.png", "rejected": "r1.png", "votes": ["chosen", "rejected", "tie"]},
        {"prompt": "backwards", "chosen": "c1.png", "rejected": "r1.png", "votes": {"chosen": 0, "rejected": 3}},
        {"prompt": "bad file", "chosen": "broken.png", "rejected": "r1.png"},
        {"prompt": "no file", "chosen": "missing.png", "rejected": "r1.png"},
        {"prompt": "", "chosen": "c2.png", "rejected": "r2.png"},
        {"prompt": "weak", "chosen": "c2.png", "rejected": "r2.png", "votes": [2, 1]},
    ])
    ds, report = load_preference_dataset(str(folder), min_agreement=0.7)
    assert report.total == 12 and report.kept == 4 and len(ds) == 4
    assert report.dropped == {"identical images": 1, "tie": 2, "votes favour rejected": 1, "unreadable chosen image": 1,
                              "chosen image not found": 1, "missing prompt": 1, "agreement below 0.7": 1}
    assert "kept 4/12" in str(report)
    row = ds[0]
    assert isinstance(row["chosen"], PILImage.Image) and row["prompt"] == "a photo number 0"
    # Without the agreement filter the 2-of-3 pair stays.
    assert load_preference_dataset(str(folder))[1].kept == 5


def test_file_name_keys_and_saved_dataset(tmp_path):
    folder = write_synthetic_pairs(tmp_path / "pairs", n=2, size=16)
    (folder / "metadata.jsonl").write_text(json.dumps(
        {"prompt": "p", "chosen_file_name": "c0.png", "rejected_file_name": "r0.png"}) + "\n")
    ds, report = load_preference_dataset(str(folder / "metadata.jsonl"))
    assert report.kept == 1 and ds.features["chosen"] == Image()

    # What the annotation bridge exports: a datasets folder with Image columns, custom prompt column.
    saved = Dataset.from_dict({
        "caption": ["a", "b"], "chosen": [str(folder / "c0.png"), str(folder / "c1.png")],
        "rejected": [str(folder / "r0.png"), str(folder / "r1.png")], "agreement": [1.0, 0.34],
    }).cast_column("chosen", Image()).cast_column("rejected", Image())
    saved.save_to_disk(tmp_path / "saved")
    ds, report = load_preference_dataset(str(tmp_path / "saved"), prompt_column="caption", min_agreement=0.5)
    assert report.kept == 1 and ds[0]["prompt"] == "a"


def test_user_errors(tmp_path):
    folder = write_synthetic_pairs(tmp_path / "pairs", n=2, size=16)
    with pytest.raises(ValueError, match="not found"):
        load_preference_dataset(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither an 'agreement' nor a 'votes'"):
        Dataset.from_dict({"prompt": ["a"], "chosen": [str(folder / "c0.png")], "rejected": [str(folder / "r0.png")]}
                          ).save_to_disk(tmp_path / "plain")
        load_preference_dataset(str(tmp_path / "plain"), min_agreement=0.5)
    Dataset.from_dict({"prompt": ["a"], "image": [str(folder / "c0.png")]}).save_to_disk(tmp_path / "sft")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['chosen', 'rejected'\]"):
        load_preference_dataset(str(tmp_path / "sft"))
    _append(folder, [{"prompt": "x", "chosen": "c0.png", "rejected": "c0.png"}])
    (folder / "metadata.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "c0.png", "rejected": "c0.png"}) + "\n")
    with pytest.raises(ValueError, match="no usable preference pairs.*1 identical images"):
        load_preference_dataset(str(folder))


def test_vote_formats():
    assert vote_counts([3, 1]) == (3.0, 1.0)
    assert vote_counts({"chosen": 2, "rejected": 1}) == (2.0, 1.0)
    assert vote_counts(["chosen", "Chosen", "rejected"]) == (2.0, 1.0)
    assert vote_counts("[0, 2]") == (0.0, 2.0)
    assert vote_counts(None) is None and vote_counts(5) is None
