"""End to end against a REAL Label Studio 1.23.2 server (own venv), three real annotators with their own tokens.

One server for the module (started on a free loopback port, stopped at the end). Skipped only when the server
venv is absent and CI is not set (see annotation_helpers.require_label_studio).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from annotation_helpers import annotate, pairwise_result, rating_result, signup, start_server, task_ids_by  # noqa: E402

from annotation.agreement import fleiss_kappa, krippendorff_alpha  # noqa: E402
from annotation.cli import main  # noqa: E402

PAIR_PROMPTS = {f"P{i}": f"a poster that says 'sale {i}'" for i in range(1, 8)}


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelstudio")
    srv = start_server(root)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def raters(ls):
    return [signup(ls.url, ls.token, f"rater{i}@example.com") for i in range(1, 4)]


@pytest.fixture
def env(ls, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", ls.token)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(ls.document_root))
    return ls


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _png(path: Path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)


@pytest.fixture(scope="module")
def pair_files(ls):
    """pairs.jsonl under the server's document root: 7 pairs, images a/b with distinct colours."""
    run_dir = ls.document_root / "run1"
    rows = []
    for n, (pid, prompt) in enumerate(PAIR_PROMPTS.items()):
        _png(run_dir / "images" / f"{pid}_a.png", (10 * n, 200, 0))
        _png(run_dir / "images" / f"{pid}_b.png", (0, 10 * n, 200))
        rows.append({"pair_id": pid, "prompt": prompt, "image_a": f"images/{pid}_a.png",
                     "image_b": f"images/{pid}_b.png", "seed_a": 0, "seed_b": 1})
    path = run_dir / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_project(ls, raters, pair_files):
    """Push once, then every rater labels through the API with their own token."""
    import io
    import os
    from contextlib import redirect_stdout

    os.environ["LABEL_STUDIO_API_KEY"] = ls.token
    try:
        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = main(["push-pairs", str(pair_files), "--title", "pairs e2e", "--url", ls.url,
                       "--document-root", str(ls.document_root)])
    finally:
        del os.environ["LABEL_STUDIO_API_KEY"]
    assert rc == 0
    summary = json.loads(buf.getvalue())
    assert summary["created"] and summary["imported"] == 7
    pid = summary["project_id"]
    tid = task_ids_by(ls.url, ls.token, pid, "pair_id")
    r1, r2, r3 = raters
    L, R, B = pairwise_result("left"), pairwise_result("right"), pairwise_result("both_bad")
    annotate(ls.url, r1.token, tid["P1"], L)          # P1: L L R   -> a wins 2/3
    annotate(ls.url, r2.token, tid["P1"], L)
    annotate(ls.url, r3.token, tid["P1"], R)
    for r in raters:                                   # P2: R R R   -> b wins 3/3
        annotate(ls.url, r.token, tid["P2"], R)
    annotate(ls.url, r1.token, tid["P3"], L)          # P3: L R skip -> tie
    annotate(ls.url, r2.token, tid["P3"], R)
    annotate(ls.url, r3.token, tid["P3"], None, cancelled=True)
    annotate(ls.url, r1.token, tid["P4"], L)          # P4: r1 L then R (latest counts), R, L -> b wins 2/3
    annotate(ls.url, r1.token, tid["P4"], R)
    annotate(ls.url, r2.token, tid["P4"], R)
    annotate(ls.url, r3.token, tid["P4"], L)
    annotate(ls.url, r1.token, tid["P5"], B)          # P5: both-bad majority -> dropped
    annotate(ls.url, r2.token, tid["P5"], B)
    annotate(ls.url, r3.token, tid["P5"], L)
    for r in raters:                                   # P6: L L R + admin L: 4 raters > 3 -> a wins 3/4
        annotate(ls.url, r.token, tid["P6"], R if r is r3 else L)
    annotate(ls.url, ls.token, tid["P6"], L)
    # P7: nobody -> too few votes
    return pid


EXPECTED_UNITS = [["left", "left", "right"], ["right"] * 3, ["left", "right"], ["left", "right", "right"],
                  ["both_bad", "both_bad", "left"], ["left", "left", "right", "left"], []]


def test_pull_majority_counts_agreement(env, capsys, tmp_path, pairs_project, pair_files):
    out = tmp_path / "prefs"
    rc, stdout, err = run(capsys, "pull", "--project-id", pairs_project, "--out", out)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcomes"] == {"kept": 4, "ties": 1, "no_majority": 0, "both_bad": 1, "judged_same": 0, "too_few_votes": 1}
    assert summary["duplicate_annotations"] == 1 and summary["tasks_with_duplicates"] == 1
    assert summary["skipped_annotations"] == 1
    assert summary["tasks_over_limit"] == 1
    assert summary["tasks_by_votes"] == {"0": 1, "1": 0, "2": 1, "3": 4, ">3": 1}
    # Agreement on the deduplicated votes (P4 counts r1's latest "right")
    full = [u for u in EXPECTED_UNITS if len(u) == 3]
    kappa = fleiss_kappa([[u.count(c) for c in ("left", "right", "both_bad")] for u in full])
    alpha = krippendorff_alpha(EXPECTED_UNITS)
    assert summary["agreement"]["fleiss_items"] == 4
    assert math.isclose(summary["agreement"]["fleiss_kappa"], round(kappa, 4), abs_tol=1e-4)
    assert math.isclose(summary["agreement"]["krippendorff_alpha"], round(alpha, 4), abs_tol=1e-4)
    assert summary["agreement"]["krippendorff_alpha"] == pytest.approx(0.1146, abs=1e-4)

    import datasets
    ds = datasets.load_from_disk(str(out / "hf"))
    assert set(ds.column_names) >= {"prompt", "chosen", "rejected", "votes", "agreement", "pair_id"}
    assert isinstance(ds.features["chosen"], datasets.Image)
    rows = {r["pair_id"]: r for r in ds}
    assert sorted(rows) == ["P1", "P2", "P4", "P6"]
    expect = {"P1": ("a", 2, 2 / 3), "P2": ("b", 3, 1.0), "P4": ("b", 2, 2 / 3), "P6": ("a", 3, 0.75)}
    images = pair_files.parent / "images"
    for pid, (side, votes, agreement) in expect.items():
        other = "b" if side == "a" else "a"
        row = rows[pid]
        assert row["prompt"] == PAIR_PROMPTS[pid]
        assert row["votes"] == votes and row["agreement"] == pytest.approx(agreement, abs=1e-6)
        assert row["chosen"].convert("RGB").getpixel((0, 0)) == Image.open(images / f"{pid}_{side}.png").getpixel((0, 0))
        assert row["rejected"].convert("RGB").getpixel((0, 0)) == Image.open(images / f"{pid}_{other}.png").getpixel((0, 0))
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert {m["pair_id"]: (m["chosen"], m["rejected"]) for m in meta}["P4"] == ("images/P4_b.png", "images/P4_a.png")
    assert all((out / m["chosen"]).is_file() and (out / m["rejected"]).is_file() for m in meta)
    # align's DPO loader reads the folder as it is
    from align.data.preference import _load
    assert sorted(_load(str(out), "train")["pair_id"]) == ["P1", "P2", "P4", "P6"]

    # pulling into an existing folder refuses without --overwrite and leaves it intact
    rc, _, err = run(capsys, "pull", "--project-id", pairs_project, "--out", out)
    assert rc == 2 and "already exists" in err and (out / "summary.json").exists()


def test_repush_adds_nothing(env, capsys, pairs_project, pair_files):
    rc, out, err = run(capsys, "push-pairs", pair_files, "--title", "pairs e2e")
    assert rc == 0, err
    s = json.loads(out)
    assert s == {**s, "project_id": pairs_project, "created": False, "imported": 0, "already_present": 7}
    assert len(task_ids_by(env.url, env.token, pairs_project, "pair_id")) == 7


def test_status(env, capsys, pairs_project, raters):
    rc, out, err = run(capsys, "status", "--project-id", pairs_project, "--json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["tasks"] == 7 and s["tasks_by_votes"]["3"] == 4
    # P1..P6 for every rater except the skip on P3 (no vote); the admin voted once (P6)
    assert s["votes_per_rater"] == {"admin@example.com": 1, "rater1@example.com": 6, "rater2@example.com": 6,
                                    "rater3@example.com": 5}
    # agreement with each task's majority (P1, P2, P4, P5, P6 have one): rater3 was outvoted on all but P2
    assert s["rater_agreement"] == {
        "rater3@example.com": {"tasks": 5, "agree": 1, "rate": 0.2},
        "admin@example.com": {"tasks": 1, "agree": 1, "rate": 1.0},
        "rater1@example.com": {"tasks": 5, "agree": 5, "rate": 1.0},
        "rater2@example.com": {"tasks": 5, "agree": 5, "rate": 1.0}}
    assert list(s["rater_agreement"])[0] == "rater3@example.com"      # who disagrees most comes first
    rc, out, _ = run(capsys, "status", "--project-id", pairs_project)
    assert rc == 0 and "Fleiss kappa" in out and "rater3@example.com: 5" in out
    assert "per annotator: rater3@example.com: 1/5 (20%)" in out


def test_pull_names_raters_like_status(env, capsys, tmp_path, pairs_project):
    rc, _, err = run(capsys, "pull", "--project-id", pairs_project, "--out", tmp_path / "p")
    assert rc == 0, err
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert set(summary["votes_per_rater"]) == set(summary["rater_agreement"]) == {
        "admin@example.com", "rater1@example.com", "rater2@example.com", "rater3@example.com"}


def test_pull_before_enough_votes_writes_an_empty_dataset(env, capsys, tmp_path, raters):
    import datasets

    run_dir = env.document_root / "fresh"
    _png(run_dir / "a.png", (200, 0, 0))
    _png(run_dir / "b.png", (0, 0, 200))
    (run_dir / "pairs.jsonl").write_text(json.dumps({"pair_id": "F1", "prompt": "p", "image_a": "a.png",
                                                     "image_b": "b.png"}) + "\n")
    rc, out, err = run(capsys, "push-pairs", run_dir / "pairs.jsonl", "--title", "fresh e2e")
    assert rc == 0, err
    pid = json.loads(out)["project_id"]
    annotate(env.url, raters[0].token, task_ids_by(env.url, env.token, pid, "pair_id")["F1"], pairwise_result("left"))
    rc, out, err = run(capsys, "pull", "--project-id", pid, "--out", tmp_path / "none")
    assert rc == 0 and "error" not in err, err
    assert out.splitlines()[-1] == f"0 pairs have 2 votes yet: wrote an empty dataset to {tmp_path / 'none'}"
    ds = datasets.load_from_disk(str(tmp_path / "none" / "hf"))
    assert len(ds) == 0 and set(ds.column_names) >= {"prompt", "chosen", "rejected"}
    assert (tmp_path / "none" / "metadata.jsonl").read_text() == ""


def test_ratings_roundtrip(env, capsys, tmp_path, raters):
    run_dir = env.document_root / "sft1"
    rows = []
    for i in range(3):
        _png(run_dir / f"c{i}.png", (50 * i, 0, 0))
        rows.append({"candidate_id": f"c{i}", "prompt": f"logo {i}", "image": f"c{i}.png"})
    (run_dir / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = run(capsys, "push-ratings", run_dir / "candidates.jsonl", "--title", "ratings e2e")
    assert rc == 0, err
    pid = json.loads(out)["project_id"]
    tid = task_ids_by(env.url, env.token, pid, "candidate_id")
    stars = {"c0": [5, 4, 5], "c1": [2, 3, None]}          # c2 unrated; rater3 skips c1
    for cid, given in stars.items():
        for r, s in zip(raters, given):
            annotate(env.url, r.token, tid[cid], rating_result(s) if s else None, cancelled=s is None)
    out_dir = tmp_path / "sft"
    rc, _, err = run(capsys, "pull", "--project-id", pid, "--out", out_dir)
    assert rc == 0, err
    meta = {m["candidate_id"]: m for m in map(json.loads, (out_dir / "metadata.jsonl").read_text().splitlines())}
    assert sorted(meta) == ["c0", "c1"]
    assert meta["c0"]["ratings"] == [5.0, 4.0, 5.0] and meta["c1"]["ratings"] == [2.0, 3.0]
    assert meta["c0"]["prompt"] == "logo 0" and (out_dir / meta["c0"]["file_name"]).is_file()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["outcomes"] == {"rated": 2, "unrated": 1} and summary["skipped_annotations"] == 1
    assert summary["agreement"]["krippendorff_alpha"] == pytest.approx(
        krippendorff_alpha([[5, 4, 5], [2, 3]], metric="interval"), abs=1e-4)
    import datasets
    ds = datasets.load_from_disk(str(out_dir / "hf"))
    assert isinstance(ds.features["image"], datasets.Image) and sorted(ds["candidate_id"]) == ["c0", "c1"]
    # the SFT loader reads the imagefolder directly
    from align.data.loading import load_image_dataset
    sft = load_image_dataset(str(out_dir))
    assert sorted(map(list, sft["ratings"])) == [[2.0, 3.0], [5.0, 4.0, 5.0]]


def test_errors_are_one_line_and_never_leak_the_token(env, capsys, caplog, tmp_path, pairs_project, pair_files,
                                                      monkeypatch):
    def check(rc, err, *needles):
        assert rc == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        for n in needles:
            assert n in lines[0], lines[0]
        assert env.token not in err

    rc, out, err = run(capsys, "status", "--project-id", "999")
    check(rc, err, "unknown project 999")
    with caplog.at_level(logging.DEBUG):                 # -v: debug logs of httpx/httpcore/SDK too
        rc, out, err = run(capsys, "status", "--project-id", pairs_project, "-v")
    assert rc == 0 and "HTTP Request" in caplog.text and env.token not in caplog.text + out + err
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-a-valid-token-0123456789")
    rc, out, err = run(capsys, "status", "--project-id", pairs_project)
    check(rc, err, "rejected the API token")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", env.token)
    from annotation.server import free_port
    rc, out, err = run(capsys, "pull", "--project-id", pairs_project, "--out", tmp_path / "x",
                       "--url", f"http://127.0.0.1:{free_port()}", "--retries", "1", "--backoff", "0.05")
    check(rc, err, "cannot reach Label Studio")
    assert not (tmp_path / "x").exists()

    # an image outside the storage root: refused before any project or task is created
    bad = pair_files.parent / "bad.jsonl"
    _png(env.document_root / "outside.png", (1, 2, 3))
    bad.write_text(json.dumps({"pair_id": "X1", "prompt": "p", "image_a": "images/P1_a.png",
                               "image_b": "../outside.png"}) + "\n")
    rc, out, err = run(capsys, "push-pairs", bad, "--title", "escape test")
    check(rc, err, "escapes the storage root")
    from annotation.client import LabelStudioClient
    assert LabelStudioClient(env.url, env.token).find_project("escape test") is None

    # a task (imported behind our back) whose path escapes the storage root: pull fails, writes nothing
    c = LabelStudioClient(env.url, env.token)
    evil = c.create_project("evil e2e", c.get_project(pairs_project)["label_config"], 3)
    c.ensure_local_storage(evil, pair_files.parent)
    c.import_tasks(evil, [{"data": {"pair_id": "E1", "prompt": "p", "image_a": "/data/local-files/?d=run1/x.png",
                                    "image_b": "/data/local-files/?d=run1/y.png", "file_a": "../../../../etc/passwd",
                                    "file_b": "images/P1_b.png"}}])
    rc, out, err = run(capsys, "pull", "--project-id", evil, "--out", tmp_path / "evil")
    check(rc, err, "escapes the storage root")
    assert not (tmp_path / "evil").exists()
    assert not list(tmp_path.glob(".evil*"))


# ---- edit tasks: instruction + 1-3 source images + the edit(s) ----------------------------------------------
EDIT_SOURCES = {"E1": ["src0"], "E2": ["src0", "src1"], "E3": ["src0", "src1", "src2"], "E4": ["src2"]}


def _texture(path: Path, seed: int, offset: int) -> None:
    """32x32 noise (DPO needs pixel-distinct chosen/rejected; a flat colour would do for the votes alone)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    arr = (rng.integers(0, 60, (32, 32, 3)) + offset).clip(0, 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def edit_dir(ls):
    run_dir = ls.document_root / "edit1"
    for k in range(3):
        _texture(run_dir / "sources" / f"src{k}.png", 100 + k, 60 * k)
    rows = []
    for n, (pid, sources) in enumerate(EDIT_SOURCES.items()):
        _texture(run_dir / "images" / f"{pid}_a.png", n, 170)
        _texture(run_dir / "images" / f"{pid}_b.png", n, 10)
        rows.append({"pair_id": pid, "prompt": f'replace the text with "SALE {n}"', "image_a": f"images/{pid}_a.png",
                     "image_b": f"images/{pid}_b.png", "control_images": [f"sources/{s}.png" for s in sources]})
    (run_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.fixture(scope="module")
def edit_pairs_project(ls, raters, edit_dir):
    """push-pairs of a file with sources makes an edit-pair project; three raters vote through the API."""
    import os
    from contextlib import redirect_stdout
    from io import StringIO

    os.environ["LABEL_STUDIO_API_KEY"] = ls.token
    try:
        with redirect_stdout(StringIO()) as buf:
            rc = main(["push-pairs", str(edit_dir / "pairs.jsonl"), "--title", "edit pairs e2e", "--url", ls.url,
                       "--document-root", str(ls.document_root)])
    finally:
        del os.environ["LABEL_STUDIO_API_KEY"]
    assert rc == 0
    summary = json.loads(buf.getvalue())
    assert summary["kind"] == "edit-pairs" and summary["created"] and summary["imported"] == 4
    pid = summary["project_id"]
    from annotation.client import LabelStudioClient
    config = LabelStudioClient(ls.url, ls.token).get_project(pid)["label_config"]
    assert 'valueList="$control_images"' in config and "<Pairwise" in config
    tid = task_ids_by(ls.url, ls.token, pid, "pair_id")
    L, R, B = pairwise_result("left"), pairwise_result("right"), pairwise_result("both_bad")
    for r, votes in zip(raters, [(L, R, L, B), (L, R, L, B), (R, R, L, L)]):
        for pair, vote in zip(EDIT_SOURCES, votes):       # E1: L L R -> a; E2: R R R -> b; E3: L L L -> a;
            annotate(ls.url, r.token, tid[pair], vote)    # E4: both bad, both bad, L -> dropped
    return pid


def test_edit_pairs_pull_feeds_edit_dpo(env, capsys, tmp_path, edit_pairs_project, edit_dir):
    out = tmp_path / "edit_prefs"
    rc, stdout, err = run(capsys, "pull", "--project-id", edit_pairs_project, "--out", out)
    assert rc == 0, err
    assert "edit-pairs: 4 tasks" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "edit-pairs" and summary["tasks_by_votes"]["3"] == 4
    assert summary["outcomes"] == {"kept": 3, "ties": 0, "no_majority": 0, "both_bad": 1, "judged_same": 0, "too_few_votes": 0}
    meta = {m["pair_id"]: m for m in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())}
    assert sorted(meta) == ["E1", "E2", "E3"]
    winners = {"E1": ("a", "b"), "E2": ("b", "a"), "E3": ("a", "b")}
    for pid, (won, lost) in winners.items():
        m = meta[pid]
        assert m["prompt"].startswith("replace the text with") and m["votes"] == 3 - (pid == "E1")
        assert (out / m["chosen"]).read_bytes() == (edit_dir / "images" / f"{pid}_{won}.png").read_bytes()
        assert (out / m["rejected"]).read_bytes() == (edit_dir / "images" / f"{pid}_{lost}.png").read_bytes()
        assert [(out / c).read_bytes() for c in m["control_images"]] == [
            (edit_dir / "sources" / f"{s}.png").read_bytes() for s in EDIT_SOURCES[pid]]   # in order
    assert len(list((out / "images").glob("source_*"))) == 3          # each shared source written once

    # the edit DPO loader reads both the folder and hf/ as they are
    from align.data.edit import load_edit_preference_dataset
    for name in (out, out / "hf"):
        pairs, report = load_edit_preference_dataset(str(name))
        assert report.kept == 3 and sorted(map(len, pairs["control_images"])) == [1, 2, 3]

    # ... and one step of edit Flow-DPO on the tiny Edit-2509 model trains on it
    from align.dpo import main as dpo_main
    root = Path(__file__).resolve().parents[1]
    trainer = dpo_main(["--config", str(root / "recipes/tiny/edit_dpo_lora.yaml"), "--tiny_variant", "edit-2509",
                        "--dataset_name", str(out), "--cache_dir", str(tmp_path / "cache"), "--output_dir",
                        str(tmp_path / "dpo"), "--eval_fraction", "0", "--eval_strategy", "no",
                        "--per_device_train_batch_size", "1", "--max_steps", "1", "--logging_steps", "1"])
    assert trainer.qwen.edit_model and not trainer.qwen.transformer.config.zero_cond_t
    assert sorted(len(b["references"].shapes) for b in trainer.get_train_dataloader()) == [1, 2, 3]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 1 and len(losses) == 1 and math.isfinite(losses[0])


def test_edit_ratings_pull_feeds_edit_sft(env, capsys, tmp_path, raters, edit_dir):
    rows = [{"candidate_id": f"c{i}", "prompt": "add a red hat", "image": f"images/E{i + 1}_a.png",
             "control_image": "sources/src0.png", **({"control_image_1": "sources/src1.png"} if i == 1 else {})}
            for i in range(3)]
    (edit_dir / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = run(capsys, "push-ratings", edit_dir / "candidates.jsonl", "--title", "edit ratings e2e")
    assert rc == 0, err
    pushed = json.loads(out)
    assert pushed["kind"] == "edit-ratings" and pushed["imported"] == 3
    tid = task_ids_by(env.url, env.token, pushed["project_id"], "candidate_id")
    for cid, stars in {"c0": [5, 4, 5], "c1": [5, 5, 5], "c2": [2, 3, 2]}.items():
        for r, s in zip(raters, stars):
            annotate(env.url, r.token, tid[cid], rating_result(s))
    sft = tmp_path / "edit_sft"
    rc, _, err = run(capsys, "pull", "--project-id", pushed["project_id"], "--out", sft)
    assert rc == 0, err
    from align.data.edit import control_problem, load_edit_dataset
    from align.data.ratings import filter_by_ratings
    ds = load_edit_dataset(str(sft))
    assert sorted(map(list, ds["ratings"])) == [[2.0, 3.0, 2.0], [5.0, 4.0, 5.0], [5.0, 5.0, 5.0]]
    kept, summary = filter_by_ratings(ds)                             # the SFT default: >= 3 raters, mean >= 4.5
    assert sorted(kept["candidate_id"]) == ["c0", "c1"] and summary.dropped == {"low_score": 1}
    assert {c: len(k) for c, k in zip(kept["candidate_id"], kept["control_images"])} == {"c0": 1, "c1": 2}
    assert all(control_problem(row) is None for row in kept.select_columns(["control_images"]))
    import datasets
    hf = datasets.load_from_disk(str(sft / "hf"))
    assert isinstance(hf.features["control_images"].feature, datasets.Image)
    # ... and one edit SFT step on the tiny Edit-2509 model trains on the rows the filter keeps
    from align.sft import main as sft_main
    root = Path(__file__).resolve().parents[1]
    trainer = sft_main(["--config", str(root / "recipes/tiny/edit_sft_lora.yaml"), "--tiny_variant", "edit-2509",
                        "--dataset_name", str(sft), "--cache_dir", str(tmp_path / "cache"), "--output_dir",
                        str(tmp_path / "sft_run"), "--min_raters", "3", "--per_device_train_batch_size", "1",
                        "--max_steps", "1", "--logging_steps", "1"])
    data = json.loads((tmp_path / "sft_run" / "data_summary.json").read_text())
    assert (data["kept"], data["total"], data["dropped"]) == (2, 3, {"low_score": 1})
    assert trainer.state.global_step == 1


def test_bad_edit_inputs_are_one_line_errors(env, capsys, tmp_path, edit_dir, pairs_project, edit_pairs_project):
    from annotation.client import LabelStudioClient
    c = LabelStudioClient(env.url, env.token)

    def check(rc, err, needle):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err

    good = {"prompt": "p", "image_a": "images/E1_a.png", "image_b": "images/E1_b.png"}
    cases = {"missing": ({**good, "control_images": ["sources/src0.png", "sources/gone.png"]},
                         "source 2: image "),
             "four": ({**good, "control_images": [f"sources/src{k % 3}.png" for k in range(4)]},
                      "record 1: 4 source images; Edit-2509/2511 take 1 to 3"),
             "none": ({**good, "control_images": []}, "record 1: no source image")}
    for name, (row, needle) in cases.items():
        bad = edit_dir / f"bad_{name}.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        rc, _, err = run(capsys, "push-pairs", bad, "--title", f"bad edit {name}")
        check(rc, err, needle)
        assert name != "missing" or "gone.png does not exist" in err
        assert c.find_project(f"bad edit {name}") is None              # refused before anything was created
    # an edit file into a text-to-image project (and back) is refused
    rc, _, err = run(capsys, "push-pairs", edit_dir / "pairs.jsonl", "--project-id", pairs_project)
    check(rc, err, "is a pairs project, not edit-pairs")
    # an edit task imported behind our back without its sources: pull says so, writes nothing
    evil = c.create_project("edit evil e2e", c.get_project(edit_pairs_project)["label_config"], 3)
    c.import_tasks(evil, [{"data": {"pair_id": "X", "prompt": "p", "image_a": "/data/local-files/?d=edit1/a.png",
                                    "image_b": "/data/local-files/?d=edit1/b.png", "control_images": []}}])
    rc, _, err = run(capsys, "pull", "--project-id", evil, "--out", tmp_path / "evil", "--fetch", "http")
    check(rc, err, "no source images ('control_images') in an edit project")
    assert not (tmp_path / "evil").exists()


def test_killed_server_mid_pull_then_rerun(env, capsys, tmp_path, pairs_project, monkeypatch):
    """The server dies while pull downloads images: clear error, nothing written; after a restart a rerun works."""
    from annotation.client import LabelStudioClient
    real_fetch = LabelStudioClient.fetch
    calls = []

    def fetch_then_die(self, url):
        calls.append(url)
        if len(calls) == 2:
            env.kill()
        return real_fetch(self, url)

    monkeypatch.setattr(LabelStudioClient, "fetch", fetch_then_die)
    out = tmp_path / "prefs"
    rc, _, err = run(capsys, "pull", "--project-id", pairs_project, "--out", out, "--fetch", "http",
                     "--retries", "2", "--backoff", "0.05")
    assert rc == 2 and len(calls) == 2
    assert err.startswith("error: ") and "cannot reach Label Studio" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".prefs*"))
    env.start(wait=120)
    rc, _, err = run(capsys, "pull", "--project-id", pairs_project, "--out", out, "--fetch", "http")
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["rows"] == 4 and len(calls) == 2 + 8
