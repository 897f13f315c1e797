"""One data-source loader (align/data/sources.py) behind the image, preference and prompt loaders: the same name
resolves the same way for all three, and each keeps its own readers and checks."""

import json

import pytest
from datasets import Dataset, DatasetDict
from PIL import Image

from align.data.loading import load_image_dataset
from align.data.preference import load_preference_dataset, write_synthetic_pairs
from align.data.prompts import load_prompt_dataset
from align.data.sources import load_source
from qwen_image.errors import UserError


def test_saved_dataset_dict_split_is_taken_or_named_for_every_loader(tmp_path):
    folder = write_synthetic_pairs(tmp_path / "pairs", n=2, size=16)
    row = {"prompt": ["a"], "image": [str(folder / "c0.png")], "chosen": [str(folder / "c0.png")],
           "rejected": [str(folder / "r0.png")], "votes": [json.dumps([2, 0])]}
    DatasetDict({"train": Dataset.from_dict(row), "test": Dataset.from_dict(row)}).save_to_disk(tmp_path / "dd")
    name = str(tmp_path / "dd")
    assert len(load_image_dataset(name, "test")) == 1
    assert load_preference_dataset(name, "test")[1].kept == 1
    assert load_prompt_dataset(name, split="test")["prompt"] == ["a"]
    for load in (lambda: load_image_dataset(name, "val"), lambda: load_preference_dataset(name, "val"),
                 lambda: load_prompt_dataset(name, split="val")):
        with pytest.raises(UserError, match=r"split 'val' not in .*\(splits: \['train', 'test'\]\)"):
            load()


def test_a_missing_name_is_one_line_naming_what_was_looked_for(tmp_path):
    missing = str(tmp_path / "nothing")
    with pytest.raises(UserError, match=r"^dataset '.*nothing' not found: no such local folder or file \(nor a Hub"):
        load_image_dataset(missing)
    with pytest.raises(UserError, match=r"^preference dataset '.*nothing' not found \(give a local folder or file\)"):
        load_preference_dataset(missing)
    with pytest.raises(UserError, match=r"^prompt dataset '.*nothing' not found \(give a local folder or file\)"):
        load_prompt_dataset(missing)


def test_metadata_folder_uses_the_callers_reader_also_under_the_split(tmp_path):
    # The imagefolder rule (metadata.jsonl at the root or in <split>/) holds for preference pairs too.
    pairs = write_synthetic_pairs(tmp_path / "root" / "test", n=3, size=16)
    ds, report = load_preference_dataset(str(tmp_path / "root"), split="test")
    assert report.kept == 3 and ds[0]["chosen"].size == (16, 16)
    Image.open(pairs / "c0.png").save(pairs / "img.png")
    (pairs / "metadata.jsonl").write_text(json.dumps({"file_name": "img.png", "prompt": "p"}) + "\n")
    assert load_image_dataset(str(tmp_path / "root"), "test")["image"] == [str((pairs / "img.png").resolve())]
    # Without a metadata reader such a folder is left to datasets' own loader (prompt sets have no images).
    seen = []
    load_source(str(tmp_path / "root"), "test", metadata=lambda meta: seen.append(meta) or Dataset.from_dict({}))
    assert seen == [pairs / "metadata.jsonl"]


def test_files_go_to_the_callers_file_reader(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_prompt_dataset(str(tmp_path / "p.txt"))["prompt"] == ["one", "two"]
    with pytest.raises(UserError, match="cannot read prompts from 'p.yaml'"):
        (tmp_path / "p.yaml").write_text("x")
        load_prompt_dataset(str(tmp_path / "p.yaml"))
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(UserError, match=r"rows.jsonl:2: not valid JSON"):
        load_preference_dataset(str(tmp_path / "rows.jsonl"))
