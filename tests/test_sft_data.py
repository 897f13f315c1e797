"""SFT data pieces without a model: imagefolder loading + row checks, buckets, the batch sampler, phases."""

import json

import numpy as np
import pytest
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from align.data.buckets import BucketBatchSampler, BucketSizeFn, bucket_sizes, nearest_bucket
from align.data.loading import load_image_dataset, validate_rows
from align.data.schedule import PhaseSchedule, parse_phases
from qwen_image.errors import UserError


def write_folder(root, rows, sizes=None):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as fh:
        for i, row in enumerate(rows):
            name = row.get("file_name")
            if name and not row.pop("_no_file", False):
                w, h = (sizes or {}).get(i, (48, 32))
                Image.fromarray(np.full((h, w, 3), 20 * i, np.uint8)).save(root / name)
            fh.write(json.dumps(row) + "\n")
    return root


def test_imagefolder_loads_metadata_and_checks_rows(tmp_path):
    root = write_folder(tmp_path / "f", [
        {"file_name": "a.png", "prompt": "a", "ratings": [5, 5, 5], "language": "en"},
        {"file_name": "b.png", "prompt": "b", "ratings": [4, 5, 5], "font_style": "serif"},
    ])
    ds = load_image_dataset(str(root))
    assert set(ds.column_names) >= {"image", "file_name", "prompt", "ratings", "language", "font_style"}
    assert ds["language"] == ["en", None]
    out, summary = validate_rows(ds)
    assert isinstance(out.features["image"], ImageFeature)
    assert out[0]["image"].size == (48, 32) and summary.kept == 2


def test_missing_unreadable_image_and_empty_prompt_name_the_row(tmp_path):
    root = write_folder(tmp_path / "f", [
        {"file_name": "a.png", "prompt": "a"},
        {"file_name": "gone.png", "prompt": "b", "_no_file": True},
        {"file_name": "bad.png", "prompt": "c", "_no_file": True},
        {"file_name": "d.png", "prompt": "   "},
    ])
    (root / "bad.png").write_text("not an image")
    ds = load_image_dataset(str(root))
    with pytest.raises(ValueError) as err:
        validate_rows(ds)
    msg = str(err.value)
    assert "3 bad row(s)" in msg and "--skip_bad_rows" in msg
    assert "row 1 (file_name='gone.png'): image: image not found" in msg
    assert "row 2 (file_name='bad.png'): image: unreadable image" in msg
    assert "row 3 (file_name='d.png'): empty prompt" in msg
    out, summary = validate_rows(ds, skip_bad_rows=True)
    assert out["file_name"] == ["a.png"]
    assert summary.dropped == {"missing_image": 1, "unreadable_image": 1, "empty_prompt": 1}


def test_general_image_columns_for_preference_rows(tmp_path):
    img = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(img)
    ds = Dataset.from_dict({"prompt": ["p", "q"], "chosen": [str(img), str(img)], "rejected": [str(img), str(tmp_path / "no.png")]})
    out, summary = validate_rows(ds, image_columns=["chosen", "rejected"], skip_bad_rows=True)
    assert len(out) == 1 and summary.dropped == {"missing_image": 1}
    assert isinstance(out.features["rejected"], ImageFeature)
    with pytest.raises(ValueError, match=r"no column\(s\) \['image'\]"):
        validate_rows(ds)


def test_datasets_folder_with_image_feature(tmp_path):
    ds = Dataset.from_dict({"image": [Image.new("RGB", (16, 16))], "prompt": ["p"]}).cast_column("image", ImageFeature())
    ds.save_to_disk(str(tmp_path / "saved"))
    out, _ = validate_rows(load_image_dataset(str(tmp_path / "saved")))
    assert out[0]["image"].size == (16, 16)


def test_bad_json_line_and_unknown_dataset(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "metadata.jsonl").write_text('{"file_name": "a.png", "prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not valid JSON"):
        load_image_dataset(str(tmp_path / "f"))
    with pytest.raises(UserError, match="not found"):
        load_image_dataset(str(tmp_path / "nothing-here"))


def test_fingerprint_follows_image_files(tmp_path):
    root = write_folder(tmp_path / "f", [{"file_name": "a.png", "prompt": "a"}])
    fp1 = load_image_dataset(str(root))._fingerprint
    assert load_image_dataset(str(root))._fingerprint == fp1
    Image.new("RGB", (40, 40), "red").save(root / "a.png")  # new content, same path
    assert load_image_dataset(str(root))._fingerprint != fp1


def test_bucket_sizes_are_multiples_of_16_with_about_the_same_area():
    sizes = bucket_sizes(1024)
    assert (1024, 1024) in sizes
    for h, w in sizes:
        assert h % 16 == 0 and w % 16 == 0
        assert abs(h * w / 1024**2 - 1) < 0.03
    assert nearest_bucket(1920, 1080, sizes) == (768, 1360)
    assert nearest_bucket(1000, 1010, sizes) == (1024, 1024)
    fn = BucketSizeFn(64)
    assert fn(Image.new("RGB", (30, 60))) == (80, 48)  # 9:16 is the ratio nearest to 1:2
    assert repr(fn) == repr(BucketSizeFn(64)) and repr(fn) != repr(BucketSizeFn(32))


def pools_two_buckets():
    # bucket A: units 0..4 (rows 0..4), bucket B: units 5..7 (rows 5..7)
    return {"p": {(32, 32): [[i] for i in range(5)], (16, 64): [[i] for i in range(5, 8)]}}


def test_sampler_batches_never_mix_buckets_are_full_and_cover_every_row():
    s = BucketBatchSampler(pools_two_buckets(), batch_size=2, seed=0)
    batches = list(s)
    assert len(s) == len(batches) == 5  # ceil(5/2) + ceil(3/2)
    for b in batches:
        assert len(b) == 2 and (set(b) <= set(range(5)) or set(b) <= {5, 6, 7})
    assert set().union(*map(set, batches)) == set(range(8))
    assert list(BucketBatchSampler(pools_two_buckets(), 2, seed=0)) == batches  # deterministic
    s.set_epoch(1)
    assert list(s) != batches  # a new order each epoch
    assert list(BucketBatchSampler(pools_two_buckets(), 2, seed=0, drop_last=True)) .__len__() == 3


def test_sampler_length_is_a_multiple_of_batches_per_step_and_variants_alternate():
    s = BucketBatchSampler(pools_two_buckets(), 2, seed=0, batches_per_step=4)
    assert len(s) == 8
    flips = BucketBatchSampler({"p": {(8, 8): [[0, 10], [1, 11]]}}, 2, seed=0)
    seen = set()
    for epoch in range(8):
        flips.set_epoch(epoch)
        for b in flips:
            seen.update(b)
            assert len({i % 10 for i in b}) == 2  # each unit once per batch, one variant
    assert seen == {0, 1, 10, 11}


def test_phases_parse_validate_and_switch_pools():
    phases = parse_phases([{"until": 0.5, "resolution": 32, "synthetic_fraction": 1.0},
                           {"until": 1.0, "lr_scale": 0.5}], default_resolution=64)
    assert [(p.resolution, p.synthetic_fraction, p.lr_scale) for p in phases] == [(32, 1.0, 1.0), (64, None, 0.5)]
    assert parse_phases('[{"until": 1.0}]', 64)[0].resolution == 64
    for bad, match in [([{"until": 0.5}], "end at until: 1.0"), ([{"until": 1.0, "res": 3}], "unknown key"),
                       ([{"until": 0.6}, {"until": 0.4}], "must increase"), ([{"until": 1.0, "resolution": 20}], "multiple of 16"),
                       ([{"until": 1.0, "synthetic_fraction": 2}], r"\[0, 1\]"), ([{"until": 1.0, "lr_scale": 0}], "> 0")]:
        with pytest.raises(ValueError, match=match):
            parse_phases(bad, 64)
    sched = PhaseSchedule(phases, max_steps=10)
    assert [sched.phase_index(s) for s in (0, 4, 5, 9)] == [0, 0, 1, 1]
    assert sched.lr_scale(3) == 1.0 and sched.lr_scale(7) == 0.5
    assert sched.pool_for_batch(0, 2) == (32, "synthetic") and sched.pool_for_batch(9, 2) == (32, "synthetic")
    assert sched.pool_for_batch(10, 2) == (64, "all")
    with pytest.raises(ValueError, match="max_steps"):
        PhaseSchedule(phases, max_steps=0)


def test_synthetic_fraction_mixes_sources():
    sched = PhaseSchedule(parse_phases([{"until": 1.0, "synthetic_fraction": 0.25}], 32), max_steps=1000)
    picks = [sched.pool_for_batch(k, 1)[1] for k in range(2000)]
    assert set(picks) == {"real", "synthetic"}
    assert 0.2 < picks.count("synthetic") / len(picks) < 0.3
