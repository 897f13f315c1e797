"""generate-pairs: candidates from the tiny Qwen-Image model, pairs for push-pairs/push-ratings."""
from __future__ import annotations

import json

import pytest
from PIL import Image, ImageStat

from annotation.errors import AnnotationError
from annotation.generate import make_pairs


def test_make_pairs_all_and_best_worst():
    cands = [{"prompt": p, "image": f"{p}{s}.png", "seed": s} for p in ("x", "y") for s in range(3)]
    cands.append({"prompt": "z", "image": "z0.png", "seed": 0})           # one candidate: no pair
    pairs = make_pairs(cands, "all")
    assert len(pairs) == 6 and len({p["pair_id"] for p in pairs}) == 6
    assert all({p["image_a"][0], p["image_b"][0]} == {p["prompt"]} for p in pairs)
    assert make_pairs(cands, "all") == pairs                               # stable ids and sides
    sides = {(p["seed_a"] < p["seed_b"]) for p in pairs}
    assert sides == {True, False}                                          # sides shuffled, not always a<b
    scores = [0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.0]
    bw = make_pairs(cands, "best-worst", scores)
    assert {frozenset((p["image_a"], p["image_b"])) for p in bw} == {frozenset(("x1.png", "x0.png")),
                                                                      frozenset(("y2.png", "y1.png"))}
    with pytest.raises(AnnotationError, match="needs a reward"):
        make_pairs(cands, "best-worst")


def test_generate_pairs_cli_with_tiny_model(tmp_path, capsys):
    from annotation.cli import main
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\na blue sign that says OPEN\n")
    out = tmp_path / "gen"
    rc = main(["generate-pairs", "--prompts", str(prompts), "--out", str(out), "--num-candidates", "3",
               "--steps", "2", "--pairing", "best-worst", "--reward", "brightness"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out) == {"prompts": 2, "candidates": 6, "pairs": 2, "out": str(out)}
    cands = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [c["seed"] for c in cands] == [0, 1, 2, 0, 1, 2]
    imgs = {c["image"]: Image.open(out / c["image"]) for c in cands}
    assert all(im.size == (64, 64) for im in imgs.values())
    assert imgs["images/p0000_s0.png"].tobytes() != imgs["images/p0000_s1.png"].tobytes()   # seeds differ
    bright = {k: ImageStat.Stat(im.convert("L")).mean[0] for k, im in imgs.items()}
    for p in pairs:
        group = [c["image"] for c in cands if c["prompt"] == p["prompt"]]
        assert {p["image_a"], p["image_b"]} == {max(group, key=bright.get), min(group, key=bright.get)}
