"""Synthetic text rendering (plain / scene / template), rare characters, and the imagefolder writer."""

import json

import numpy as np
import pytest

from align.datatools import (
    MODES,
    char_frequencies,
    cjk_characters,
    detect_language,
    extract_quoted_text,
    font_path,
    missing_glyphs,
    perspective_coefficients,
    rare_characters,
    rare_strings,
    render_text_image,
    synthesize_imagefolder,
    synthesize_text_images,
    write_imagefolder,
)

FIELDS = {"prompt", "text", "language", "font_style", "text_layout", "background_type", "mode"}


def ink_bbox(img, bg_xy=(0, 0)):
    a = np.asarray(img.convert("L"), np.int16)
    mask = np.abs(a - a[bg_xy[1], bg_xy[0]]) > 60
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max(), ys.max()


def test_font_is_found_in_the_font_package():
    assert font_path("sans").endswith("NotoSansSC-Regular.otf")
    assert font_path("serif-bold").endswith("NotoSerifSC-Regular.otf")
    with pytest.raises(ValueError):
        font_path("comic")


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_size_and_metadata(mode):
    img, meta = render_text_image("新品上市 New", mode=mode, size=(240, 176), seed=3)
    assert img.size == (240, 176) and img.mode == "RGB"
    assert FIELDS <= set(meta)
    assert meta["mode"] == mode and meta["text"] == "新品上市 New" and meta["language"] == "mixed"
    assert extract_quoted_text(meta["prompt"]) == ["新品上市 New"]
    expected_bg = {"plain": {"solid"}, "scene": {"gradient", "texture", "shapes"},
                   "template": {"slide", "poster", "ui"}}[mode]
    assert meta["background_type"] in expected_bg
    # something was drawn: the image is not a flat colour
    assert np.asarray(img).std() > 10


def test_modes_differ_in_structure():
    plain, _ = render_text_image("OPEN", "plain", (128, 128), seed=0)
    # plain: the background colour is exactly uniform outside the text
    a = np.asarray(plain)
    assert (a[:5, :, :] == a[0, 0]).all()
    for bg in ("gradient", "texture", "shapes"):
        scene, meta = render_text_image("OPEN", "scene", (128, 128), seed=0, background_type=bg)
        assert meta["background_type"] == bg
        assert len(np.unique(np.asarray(scene)[:5].reshape(-1, 3), axis=0)) > 5  # not a flat border
    with pytest.raises(ValueError):
        render_text_image("OPEN", "scene", (64, 64), background_type="slide")
    with pytest.raises(ValueError):
        render_text_image("OPEN", "watercolour", (64, 64))


def test_deterministic_by_seed():
    for mode in MODES:
        a, ma = render_text_image("龘靐 abc", mode, (160, 120), seed=7)
        b, mb = render_text_image("龘靐 abc", mode, (160, 120), seed=7)
        c, _ = render_text_image("龘靐 abc", mode, (160, 120), seed=8)
        assert a.tobytes() == b.tobytes() and ma == mb
        assert a.tobytes() != c.tobytes()
    r1 = synthesize_text_images(["一二", "ab"], size=64, seed=1)
    r2 = synthesize_text_images(["一二", "ab"], size=64, seed=1)
    assert [r["image"].tobytes() for r in r1] == [r["image"].tobytes() for r in r2]


def test_vertical_layout_is_a_column_and_horizontal_a_row():
    v, m = render_text_image("新品上市", "plain", (256, 256), seed=0, text_layout="vertical")
    h, _ = render_text_image("新品上市", "plain", (256, 256), seed=0, text_layout="horizontal")
    assert m["text_layout"] == "vertical"
    x0, y0, x1, y1 = ink_bbox(v)
    assert (y1 - y0) > 2 * (x1 - x0)
    x0, y0, x1, y1 = ink_bbox(h)
    assert (x1 - x0) > 2 * (y1 - y0)


def test_text_fits_inside_the_image():
    long = "The quick brown fox jumps over the lazy dog " * 3
    img, meta = render_text_image(long.strip(), "plain", (200, 120), seed=0, text_layout="multiline")
    x0, y0, x1, y1 = ink_bbox(img)
    assert x0 > 0 and y0 > 0 and x1 < 199 and y1 < 119


def test_language_and_missing_glyphs():
    assert detect_language("新品上市") == "zh"
    assert detect_language("Hello, world") == "en"
    assert detect_language("限时 Sale") == "mixed"
    assert detect_language("123 !") == "other"
    assert missing_glyphs("新品 Sale") == []
    assert missing_glyphs("新\ue000品") == ["\ue000"]
    skipped = []
    rows = synthesize_text_images(["好", "坏\ue000"], modes=("plain",), size=48,
                                  on_skip=lambda t, m: skipped.append((t, m)))
    assert [r["text"] for r in rows] == ["好"] and skipped == [("坏\ue000", ["\ue000"])]


def test_synthesize_counts_modes_and_variants():
    rows = synthesize_text_images(["一", "two"], modes=("plain", "template"), size=(64, 48), per_text=2, seed=0)
    assert len(rows) == 2 * 2 * 2
    assert {r["mode"] for r in rows} == {"plain", "template"}
    assert all(r["image"].size == (64, 48) for r in rows)
    assert len({r["seed"] for r in rows}) == 4  # per text x variant


def test_perspective_coefficients_map_output_corners_to_input_corners():
    dst = [(10, 12), (90, 5), (100, 80), (0, 95)]
    src = [(0, 0), (50, 0), (50, 40), (0, 40)]
    a, b, c, d, e, f, g, h = perspective_coefficients(dst, src)
    for (x, y), (u, v) in zip(dst, src):
        den = g * x + h * y + 1
        assert (a * x + b * y + c) / den == pytest.approx(u, abs=1e-9)
        assert (d * x + e * y + f) / den == pytest.approx(v, abs=1e-9)


def test_rare_characters_threshold_and_candidates():
    corpus = ["的的的的是是是", "的是了", "龘"]
    counts = char_frequencies(corpus)
    assert counts["的"] == 5 and counts["龘"] == 1
    assert rare_characters(corpus, max_count=1) == ["了", "龘"]  # count 1 each, code-point order
    assert rare_characters(corpus, max_count=0) == []
    assert rare_characters(corpus, max_count=4) == ["了", "龘", "是"]
    # candidates absent from the corpus count 0 and come first
    assert rare_characters(corpus, candidates="靐的龘", max_count=1) == ["靐", "龘"]
    assert rare_characters(corpus, max_count=None, max_frequency=1 / 9) == ["了", "龘"]
    assert rare_characters("abcA中", candidates=None, max_count=5, script="latin") == ["A", "a", "b", "c"]


def test_rare_strings_cover_all_and_are_seeded():
    rare = list("龘靐齉爩")
    s = rare_strings(rare, n=4, min_len=2, max_len=2, seed=0)
    assert len(s) == 4 and all(len(x) == 2 for x in s)
    assert set("".join(s)) == set(rare)  # every rare char used before repeats (8 slots, 4 chars)
    assert s == rare_strings(rare, n=4, min_len=2, max_len=2, seed=0)
    assert s != rare_strings(rare, n=4, min_len=2, max_len=2, seed=1)


def test_cjk_characters_filtered_by_font():
    chars = cjk_characters(0x4E00, 0x4E0F)
    assert chars[0] == "一" and len(chars) == 16


def test_write_imagefolder_loads_with_datasets(tmp_path):
    import datasets

    rows = synthesize_text_images(["新品上市", "Sale"], modes=("plain", "scene"), size=(64, 64), seed=0)
    out = write_imagefolder(rows, tmp_path / "folder", ratings=[[5, 4, 5]] * len(rows))
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 4 and lines[0]["file_name"] == "000000.png" and lines[0]["text"] == "新品上市"
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 4
    assert FIELDS | {"image", "ratings"} <= set(ds.column_names)
    assert ds[0]["image"].size == (64, 64)
    assert ds[0]["ratings"] == [5.0, 4.0, 5.0]
    assert sorted(ds["text"]) == sorted(r["text"] for r in rows)
    # lossless: pixels round-trip
    by_text_mode = {(r["text"], r["mode"]): r["image"] for r in rows}
    for row in ds:
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(by_text_mode[(row["text"], row["mode"])]))
    with pytest.raises(FileExistsError):
        write_imagefolder(rows, out)


def test_synthesize_imagefolder_one_call(tmp_path):
    out = synthesize_imagefolder(["你好"], tmp_path / "f", modes=("template",), size=32)
    assert (out / "000000.png").exists() and len((out / "metadata.jsonl").read_text().splitlines()) == 1


def test_cli_synth_then_filter(tmp_path, capsys):
    from align.datatools.__main__ import main

    assert main(["synth", "--texts", "新品上市", "OPEN", "--out", str(tmp_path / "a"), "--size", "96", "64",
                 "--modes", "plain"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert main(["filter", "--data-dir", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--min-side", "80",
                 "--no-exposure"]) == 0
    report = json.loads((tmp_path / "b" / "filter_report.json").read_text())
    assert report["total"] == 2 and report["kept"] == 0 and report["counts"] == {"resolution": 2}
