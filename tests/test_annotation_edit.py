"""Edit tasks for Label Studio without a server: the configs, the task rows (sources), the bad inputs, and
generate-pairs --edits with the tiny edit model. The server round trip is in tests/test_annotation_server.py."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from annotation.configs import KINDS, label_config, project_kind
from annotation.errors import AnnotationError
from annotation.push import SPECS, ImagePlacement, build_tasks, detect_kind


def test_source_columns_match_the_edit_loader():
    """annotation/ repeats align/data/edit.py's column names (it never imports torch): they must agree."""
    from align.data import edit
    from annotation import push
    from qwen_image.edit import MAX_REFERENCES

    assert push.CONTROL_COLUMNS == edit.CONTROL_COLUMNS and push.CONTROL_LIST_COLUMN == edit.CONTROL_LIST_COLUMN
    assert push.MAX_SOURCES == MAX_REFERENCES


def test_edit_configs_show_the_sources_and_the_kind_round_trips():
    from label_studio_sdk.label_interface import LabelInterface

    for kind in KINDS:
        config = label_config(kind, per_image_rating=True)
        assert project_kind(config) == kind
        root = ET.fromstring(config)
        sources = [e for e in root.iter("Image") if e.get("name") == "sources"]
        if kind.startswith("edit-"):
            assert [e.get("valueList") for e in sources] == ["$control_images"]
        else:
            assert not sources
        LabelInterface(config)  # the SDK parses it
    pair = ET.fromstring(label_config("edit-pairs"))
    assert next(pair.iter("Pairwise")).get("toName") == "img_a,img_b"      # the votes read as for T2I pairs
    assert "instruction" in " ".join(h.get("value") for h in pair.iter("Header"))
    with pytest.raises(AnnotationError, match="neither a pairwise nor a rating"):
        project_kind("<View/>")


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "doc" / "run"
    root.mkdir(parents=True)
    for n in ("a.png", "b.png", "s1.png", "s2.png", "s3.png", "s4.png"):
        Image.new("RGB", (8, 8)).save(root / n)
    Image.new("RGB", (8, 8)).save(tmp_path / "doc" / "outside.png")
    return root


def _tasks(run_dir, records, kind="pairs"):
    place = ImagePlacement(run_dir, document_root=run_dir.parent)
    return build_tasks(records, run_dir, place, SPECS[detect_kind(kind, records)])


def test_edit_tasks_carry_the_sources_in_order(run_dir):
    rows = [{"prompt": "add a hat", "image_a": "a.png", "image_b": "b.png", "control_images": ["s2.png", "s1.png"]},
            {"pair_id": "n", "prompt": "add a hat", "image_a": "a.png", "image_b": "b.png",
             "control_image": "s1.png", "control_image_1": "s3.png"}]
    assert detect_kind("pairs", rows) == "edit-pairs" and detect_kind("pairs", [{"prompt": "x"}]) == "pairs"
    first, numbered = (t["data"] for t in _tasks(run_dir, rows))
    assert first["control_images"] == ["/data/local-files/?d=run/s2.png", "/data/local-files/?d=run/s1.png"]
    assert first["control_files"] == ["s2.png", "s1.png"]
    assert numbered["control_files"] == ["s1.png", "s3.png"] and "control_image_1" not in numbered
    # the sources are part of the stable id: the same edits of another source are another pair
    again = _tasks(run_dir, [{**rows[0], "control_images": ["s1.png"]}])[0]["data"]
    assert again["pair_id"] != first["pair_id"]
    rating = _tasks(run_dir, [{"prompt": "p", "image": "a.png", "control_images": ["s1.png"]}], "ratings")
    assert rating[0]["data"]["control_files"] == ["s1.png"] and len(rating[0]["data"]["candidate_id"]) == 16


@pytest.mark.parametrize("extra, message", [
    ({"control_images": ["gone.png"]}, r"pair_id \w+, source 1: image .*gone.png does not exist"),
    ({"control_images": ["s1.png", "s2.png", "s3.png", "s4.png"]}, "record 2: 4 source images; Edit-2509/2511 take "
                                                                    "1 to 3"),
    ({"control_images": ["../outside.png"]}, "source 1: image path '../outside.png' escapes the storage root"),
    ({"control_image": "s1.png", "control_images": ["s1.png"]}, "record 2: both control_image and control_images"),
    ({"control_image_1": "s1.png"}, "record 2: source image 1 of 2 is empty"),
    ({}, "record 2: no source image"),             # one row of an edit file without its source
])
def test_bad_edit_rows_are_refused_before_anything_is_imported(run_dir, extra, message):
    good = {"pair_id": "g", "prompt": "p", "image_a": "a.png", "image_b": "b.png", "control_images": ["s1.png"]}
    bad = {"pair_id": "x", "prompt": "p", "image_a": "a.png", "image_b": "b.png", **extra}
    with pytest.raises(AnnotationError, match=message):
        _tasks(run_dir, [good, bad])


def _edits_file(tmp_path: Path, rows: list[dict]) -> Path:
    Image.new("RGB", (64, 32), (200, 40, 40)).save(tmp_path / "poster.png")
    Image.new("RGB", (32, 32), (40, 40, 200)).save(tmp_path / "logo.png")
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_edit_pairs_with_the_tiny_edit_model(tmp_path, capsys):
    from annotation.cli import main

    edits = _edits_file(tmp_path, [{"prompt": 'replace the text with "SALE"', "control_image": "poster.png"},
                                   {"prompt": "put the logo of picture 2 on picture 1",
                                    "control_images": ["poster.png", "logo.png"]}])
    out = tmp_path / "gen"
    rc = main(["generate-pairs", "--edits", str(edits), "--out", str(out), "--num-candidates", "2", "--steps", "2"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out) == {"edits": 2, "candidates": 4, "pairs": 2, "out": str(out)}
    cands = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert sorted(map(len, (c["control_images"] for c in cands))) == [1, 1, 2, 2]
    assert len(set(cands[2]["control_images"])) == 2 and len(list((out / "sources").iterdir())) == 2  # copied once
    for p in pairs:
        assert {p["image_a"], p["image_b"]} == {c["image"] for c in cands if c["prompt"] == p["prompt"]}
        assert p["control_images"] == next(c["control_images"] for c in cands if c["prompt"] == p["prompt"])
        for rel in p["control_images"]:                              # the sources travel with the folder
            assert (out / rel).read_bytes() == (tmp_path / ("logo.png" if "logo" in rel else "poster.png")).read_bytes()
    first = {c["seed"]: Image.open(out / c["image"]) for c in cands if c["edit_index"] == 0}
    assert first[0].width > first[0].height  # the wide source's aspect ratio (the model's default output size)
    assert first[0].tobytes() != first[1].tobytes()                                  # seeds differ
    # the folder pushes as an edit-pair project (validated here without a server)
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    tasks = _tasks(out, records)
    assert [len(t["data"]["control_images"]) for t in tasks] == [1, 2]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "control_image": "missing.png"}, r"edits.jsonl:1: source image 1 .*missing.png does not exist"),
    ({"prompt": "p", "control_images": ["poster.png"] * 4}, "edits.jsonl:1: 4 source images; Edit-2509/2511 take 1 to 3"),
    ({"prompt": "p"}, "edits.jsonl:1: no source image"),
    ({"control_image": "poster.png"}, "edits.jsonl:1: no instruction"),
])
def test_generate_edit_pairs_bad_requests_are_one_line_errors(tmp_path, capsys, row, message):
    import re

    from annotation.cli import main

    rc = main(["generate-pairs", "--edits", str(_edits_file(tmp_path, [row])), "--out", str(tmp_path / "gen")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and re.search("error: " + message, err), err
    assert not (tmp_path / "gen").exists()                           # checked before any model is loaded


def test_a_source_the_model_cannot_take_is_a_one_line_error(tmp_path, capsys):
    from annotation.cli import main

    edits = _edits_file(tmp_path, [{"prompt": "p", "control_image": "strip.png"}])
    Image.new("RGB", (256, 8)).save(tmp_path / "strip.png")          # too elongated for the tiny model's areas
    rc = main(["generate-pairs", "--edits", str(edits), "--out", str(tmp_path / "gen"), "--steps", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not torch's noise
    assert rc == 2 and len(errors) == 1
    assert errors[0].startswith("error: edit request 1 ('p'): a 256x8 reference is too elongated"), errors


def test_generate_pairs_needs_prompts_or_edits(tmp_path, capsys):
    from annotation.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate-pairs", "--out", str(tmp_path / "gen")])
    assert e.value.code == 2 and "one of the arguments --prompts --edits is required" in capsys.readouterr().err
