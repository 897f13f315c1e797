"""annotation/ without a server: agreement statistics against published values, vote aggregation rules,
label configs, push validation, client retry policy, token redaction."""
from __future__ import annotations

import json
import logging
import math
import sys
import xml.etree.ElementTree as ET

import pytest

from annotation.aggregate import aggregate_pairs, aggregate_ratings
from annotation.agreement import fleiss_kappa, krippendorff_alpha, percent_agreement
from annotation.configs import pairwise_config, rating_config
from annotation.errors import AnnotationError


# ---- agreement --------------------------------------------------------------------------------------------
def test_fleiss_kappa_wikipedia_example():
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_edge_cases():
    assert fleiss_kappa([[3, 0], [0, 3]]) == pytest.approx(1.0)
    assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))          # no variation: undefined
    with pytest.raises(ValueError):
        fleiss_kappa([[2, 1], [1, 0]])                          # unequal raters per item


def test_krippendorff_alpha_published_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units, missing values.
    N = None
    coders = [[1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
              [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]]
    units = [[v for v in col if v is not None] for col in zip(*coders)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_alpha_by_hand():
    # o(a,a)=2, o(a,b)=o(b,a)=1, o(b,b)=4; n_a=3, n_b=5, n=8: alpha = 1 - 7*2/(2*3*5) = 8/15
    assert krippendorff_alpha([["a", "a"], ["a", "b"], ["b", "b"], ["b", "b"], ["a"]]) == pytest.approx(8 / 15)
    assert percent_agreement([["a", "a", "b"], ["b", "b", "b"]]) == pytest.approx((1 / 3 + 1) / 2)


# ---- aggregation ------------------------------------------------------------------------------------------
def ann(rater, choice=None, *, at="2026-01-01T00:00:00Z", aid=1, cancelled=False, rating=None, rating_a=None):
    result = []
    if choice == "both_bad":
        result.append({"type": "choices", "from_name": "both_bad", "to_name": "img_a",
                       "value": {"choices": ["both_bad"]}})
    elif choice:
        result.append({"type": "pairwise", "from_name": "pref", "to_name": "pref", "value": {"selected": choice}})
    if rating is not None:
        result.append({"type": "rating", "from_name": "quality", "to_name": "image", "value": {"rating": rating}})
    if rating_a is not None:
        result.append({"type": "rating", "from_name": "rating_a", "to_name": "img_a", "value": {"rating": rating_a}})
    return {"id": aid, "completed_by": rater, "result": result, "was_cancelled": cancelled,
            "created_at": at, "updated_at": at}


def task(tid, *anns, **data):
    return {"id": tid, "data": {"pair_id": f"p{tid}", "prompt": f"prompt {tid}", **data}, "annotations": list(anns)}


def test_latest_annotation_per_rater_counts_and_duplicates_are_reported():
    t = task(1, ann(1, "left", at="2026-01-01T00:00:01Z", aid=10),
             ann(1, "right", at="2026-01-01T00:00:05Z", aid=11),     # rater 1 changed their mind: latest counts
             ann({"id": 2, "email": "b@x"}, "right", aid=12),        # dict form of completed_by
             ann(3, "left", aid=13))
    rows, rep = aggregate_pairs([t])
    assert [(r["chosen_side"], r["votes"], r["n_votes"]) for r in rows] == [("b", 2, 3)]
    assert rows[0]["agreement"] == pytest.approx(2 / 3)
    assert rep["duplicate_annotations"] == 1 and rep["tasks_with_duplicates"] == 1 and rep["annotations"] == 4


def test_same_timestamp_duplicates_fall_back_to_annotation_id():
    t = task(1, ann(1, "right", aid=21), ann(1, "left", aid=20), ann(2, "left", aid=22))
    rows, rep = aggregate_pairs([t])
    assert rows == [] and rep["outcomes"]["ties"] == 1          # rater 1's latest (id 21) is "right"


def test_ties_skips_both_bad_too_few_and_over_limit():
    tasks = [
        task(1, ann(1, "left"), ann(2, "right"), ann(3, cancelled=True)),       # tie, one skip
        task(2, ann(1, "both_bad"), ann(2, "both_bad"), ann(3, "left")),        # both bad wins
        task(3, ann(1, "left")),                                               # one vote < min_votes
        task(4),                                                               # nobody
        task(5, ann(1, "left"), ann(2, "left"), ann(3, "right"), ann(4, "left")),  # 4 raters > 3
        task(6, ann(1, "left"), ann(2, "left"), ann(3, "right"), ann(4, "right")),  # 4 raters, 2-2 tie
        task(7, ann(1, "right"), ann(2, "right"), ann(3)),                      # empty result = no vote
    ]
    rows, rep = aggregate_pairs(tasks, max_raters=3, min_votes=2)
    assert {r["pair_id"]: (r["chosen_side"], r["votes"], r["n_votes"]) for r in rows} == {
        "p5": ("a", 3, 4), "p7": ("b", 2, 2)}
    assert rep["outcomes"] == {"kept": 2, "ties": 2, "no_majority": 0, "both_bad": 1, "judged_same": 0, "too_few_votes": 2}
    assert rep["skipped_annotations"] == 2 and rep["tasks_over_limit"] == 2
    assert rep["tasks_by_votes"] == {"0": 1, "1": 1, "2": 2, "3": 1, ">3": 2}
    assert rep["votes_per_rater"] == {1: 6, 2: 5, 3: 3, 4: 2}
    assert rep["vote_totals"] == {"left": 8, "right": 6, "both_bad": 2, "tie": 0}
    # min_votes=1 keeps the single-vote pair
    rows1, _ = aggregate_pairs(tasks, min_votes=1)
    assert "p3" in {r["pair_id"] for r in rows1}


def test_pairs_agreement_uses_deduplicated_votes():
    tasks = [task(1, ann(1, "left", aid=1), ann(1, "right", aid=2, at="2026-01-02T00:00:00Z"), ann(2, "right"),
                  ann(3, "right")),
             task(2, ann(1, "left"), ann(2, "left"), ann(3, "right"))]
    _, rep = aggregate_pairs(tasks)
    units = [["right"] * 3, ["left", "left", "right"]]
    assert rep["agreement"]["fleiss_items"] == 2
    assert rep["agreement"]["fleiss_kappa"] == pytest.approx(
        fleiss_kappa([[u.count(c) for c in ("left", "right", "both_bad")] for u in units]), abs=1e-4)
    assert rep["agreement"]["krippendorff_alpha"] == pytest.approx(krippendorff_alpha(units), abs=1e-4)


def test_per_image_ratings_follow_the_winner():
    t = task(1, ann(1, "right", rating_a=2), ann(2, "right", rating_a=1), ann(3, "left"))
    rows, _ = aggregate_pairs([t])
    assert rows[0]["ratings_rejected"] == [1.0, 2.0] and rows[0]["ratings_chosen"] == []


def test_ratings_aggregation():
    tasks = [{"id": 1, "data": {"candidate_id": "c1", "prompt": "x"},
              "annotations": [ann(2, rating=4), ann(1, rating=5), ann(3, rating=3, aid=5),
                              ann(3, rating=5, aid=6, at="2026-02-01T00:00:00Z")]},
             {"id": 2, "data": {"candidate_id": "c2", "prompt": "y"},
              "annotations": [ann(1, rating=2), ann(2, cancelled=True)]},
             {"id": 3, "data": {"candidate_id": "c3", "prompt": "z"}, "annotations": []}]
    rows, rep = aggregate_ratings(tasks)
    assert [(r["candidate_id"], r["ratings"]) for r in rows] == [("c1", [5.0, 4.0, 5.0]), ("c2", [2.0])]
    assert rows[0]["mean_rating"] == pytest.approx(14 / 3)
    assert rep["outcomes"] == {"rated": 2, "unrated": 1} and rep["duplicate_annotations"] == 1
    assert rep["skipped_annotations"] == 1
    assert rep["agreement"]["alpha_metric"] == "interval"


# ---- configs ----------------------------------------------------------------------------------------------
def test_pairwise_config_is_valid_xml_with_the_names_pull_reads():
    root = ET.fromstring(pairwise_config(per_image_rating=True, both_bad=True))
    tags = {(e.tag, e.get("name")) for e in root.iter()}
    assert {("Pairwise", "pref"), ("Image", "img_a"), ("Image", "img_b"), ("Rating", "rating_a"),
            ("Rating", "rating_b"), ("Choices", "verdict")} <= tags
    assert next(root.iter("Pairwise")).get("toName") == "img_a,img_b"
    verdict = {c.get("alias"): c.get("hotkey") for c in root.iter("Choice")}
    assert verdict == {"left": "1", "right": "2", "tie": "3", "both_bad": "4"}
    keys_shown = " ".join(h.get("value") for h in root.iter("Header"))
    assert all(f"{k} {a.replace('_', ' ')}" in keys_shown for a, k in verdict.items())   # the keys are on the page
    assert {h.get("value") for h in root.iter("Header")} >= {"$prompt", "$size_a", "$size_b"}
    plain = ET.fromstring(pairwise_config(per_image_rating=False, both_bad=False))
    assert not list(plain.iter("Rating"))
    assert [c.get("alias") for c in plain.iter("Choice")] == ["left", "right", "tie"]
    rating = ET.fromstring(rating_config())
    assert next(rating.iter("Rating")).get("maxRating") == "5"


def test_configs_parse_with_the_sdk_label_interface():
    from label_studio_sdk.label_interface import LabelInterface
    li = LabelInterface(pairwise_config(per_image_rating=True))
    assert {"pref", "rating_a", "rating_b", "verdict"} <= set(li._controls)


# ---- push validation --------------------------------------------------------------------------------------
def test_build_tasks_rejects_paths_outside_the_storage_root(tmp_path):
    from PIL import Image

    from annotation.push import PAIRS, ImagePlacement, build_tasks
    (tmp_path / "doc" / "run").mkdir(parents=True)
    for n in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "doc" / "run" / n)
    Image.new("RGB", (4, 4)).save(tmp_path / "doc" / "outside.png")
    place = ImagePlacement(tmp_path / "doc" / "run", document_root=tmp_path / "doc")
    tasks = build_tasks([{"prompt": "p", "image_a": "a.png", "image_b": "b.png"}] * 2, tmp_path / "doc" / "run",
                        place, PAIRS)
    assert len(tasks) == 1                                         # same content -> same stable pair id
    d = tasks[0]["data"]
    assert d["image_a"] == "/data/local-files/?d=run/a.png" and d["file_b"] == "b.png" and len(d["pair_id"]) == 16
    assert d["size_a"] == "4\u00d74 px"          # the real size, shown under the (scaled) image
    with pytest.raises(AnnotationError, match="escapes the storage root"):
        build_tasks([{"prompt": "p", "image_a": "a.png", "image_b": "../outside.png"}], tmp_path / "doc" / "run",
                    place, PAIRS)
    with pytest.raises(AnnotationError, match="not under the document root"):
        ImagePlacement(tmp_path, document_root=tmp_path / "doc")
    url = ImagePlacement(tmp_path / "doc" / "run", mode="url", url_prefix="https://cdn.example.com/r7/")
    t = build_tasks([{"pair_id": "x", "prompt": "p", "image_a": "a.png", "image_b": "b.png"}],
                    tmp_path / "doc" / "run", url, PAIRS)
    assert t[0]["data"]["image_b"] == "https://cdn.example.com/r7/b.png"


# ---- client: retries, errors, redaction -------------------------------------------------------------------
def _client(**kw):
    from annotation.client import LabelStudioClient
    return LabelStudioClient("http://127.0.0.1:9", "secret-token-abcdef0123456789", backoff=0.001, **kw)


def test_transient_errors_are_retried_with_backoff():
    import httpx
    c = _client(retries=3)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise httpx.ConnectError("refused")
        return "ok"
    assert c.call("x", flaky) == "ok" and len(calls) == 3


def test_writes_are_not_retried_after_a_server_error_but_are_on_connect_errors():
    import httpx
    from label_studio_sdk.core.api_error import ApiError
    c = _client(retries=3)
    calls = []

    def boom():
        calls.append(1)
        raise ApiError(status_code=502, body={"detail": "bad gateway"})
    with pytest.raises(AnnotationError, match="HTTP 502"):
        c.call("import tasks", boom, idempotent=False)
    assert len(calls) == 1                                          # the POST may have been committed
    calls.clear()
    with pytest.raises(AnnotationError, match="HTTP 502"):
        c.call("export", boom)
    assert len(calls) == 4                                          # reads: 1 + 3 retries

    def refused():
        calls.append(1)
        raise httpx.ConnectError("refused")
    calls.clear()
    with pytest.raises(AnnotationError, match="cannot reach Label Studio"):
        c.call("import tasks", refused, idempotent=False)
    assert len(calls) == 4


def test_token_is_redacted_from_errors_and_logs(caplog, capsys, monkeypatch):
    from label_studio_sdk.core.api_error import ApiError

    from annotation.errors import install_log_redaction
    c = _client(retries=0)
    token = "secret-token-abcdef0123456789"

    def leaky():
        raise ApiError(status_code=400, body={"detail": f"bad header Token {token}"})
    with pytest.raises(AnnotationError) as e:
        c.call("x", leaky)
    assert token not in str(e.value) and "***" in str(e.value)
    install_log_redaction()
    with caplog.at_level(logging.INFO, logger="annotation"):
        logging.getLogger("annotation").info("using %s", token)
    assert token not in caplog.text


def test_cli_without_token_or_server(monkeypatch, capsys, tmp_path):
    from annotation.cli import main
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    assert main(["status", "--project-id", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: no API token: set LABEL_STUDIO_API_KEY or pass --token-file"
    monkeypatch.setenv("LABEL_STUDIO_VENV", str(tmp_path / "nope"))
    assert main(["server", "--data-dir", str(tmp_path / "d"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Label Studio server in") and "install_labelstudio.sh" in err


@pytest.mark.parametrize("cmd", ["server", "generate-pairs", "push-pairs", "push-ratings", "status", "pull"])
def test_every_command_has_help(cmd, capsys):
    from annotation.cli import main
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: qwen-image-annotation " + cmd in capsys.readouterr().out


def test_annotation_imports_no_torch_model():
    import subprocess
    code = ("import sys, annotation, annotation.cli, annotation.pull, annotation.push, annotation.server, "
            "annotation.generate; print(json.dumps([m for m in ('torch', 'qwen_image', 'diffusers') if m in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == []


def test_a_plurality_is_not_a_majority():
    """4 raters L, L, R, both-bad: "left" leads with 2/4, which is not more than half: dropped as no_majority
    (docs/annotation.md: the winner needs a strict majority); 3 of 4 is kept."""
    split = task(1, ann(1, "left"), ann(2, "left"), ann(3, "right"), ann(4, "both_bad"))
    clear = task(2, ann(1, "left"), ann(2, "left"), ann(3, "left"), ann(4, "both_bad"))
    rows, rep = aggregate_pairs([split, clear], max_raters=4, min_votes=2)
    assert [(r["pair_id"], r["votes"], r["n_votes"]) for r in rows] == [("p2", 3, 4)]
    assert rep["outcomes"]["no_majority"] == 1 and rep["outcomes"]["kept"] == 1


def _verdict(rater, choice, click=None):
    a = ann(rater, click)
    a["result"].append({"type": "choices", "from_name": "verdict", "to_name": "img_a",
                        "value": {"choices": [choice]}})
    return a


def test_verdict_keys_win_over_clicks_and_old_results_still_read():
    from annotation.aggregate import aggregate_pairs, pair_vote

    assert pair_vote(_verdict(1, "right", click="left")) == "right"   # the key/button is the deliberate answer
    assert pair_vote(_verdict(1, "tie")) == "tie"
    assert pair_vote(ann(1, "left")) == "left" and pair_vote(ann(1, "both_bad")) == "both_bad"   # older projects
    tasks = [task(1, _verdict(1, "tie"), _verdict(2, "tie"), ann(3, "left")),             # "about the same"
             task(2, _verdict(1, "both_bad"), ann(2, "both_bad"), _verdict(3, "left")),   # old and new both-bad
             task(3, _verdict(1, "left"), ann(2, "left"), ann(3, "right"))]
    rows, rep = aggregate_pairs(tasks, max_raters=3)
    assert [r["pair_id"] for r in rows] == ["p3"]
    assert rep["outcomes"] == {"kept": 1, "ties": 0, "no_majority": 0, "both_bad": 1, "judged_same": 1,
                               "too_few_votes": 0}
    # rater 3 went against the majority on all three tasks, raters 1 and 2 never
    assert rep["rater_agreement"] == {3: {"tasks": 3, "agree": 0, "rate": 0.0},
                                      1: {"tasks": 3, "agree": 3, "rate": 1.0},
                                      2: {"tasks": 3, "agree": 3, "rate": 1.0}}


def test_rating_agreement_is_within_one_star_of_the_others():
    from annotation.aggregate import aggregate_ratings

    _, rep = aggregate_ratings([task(1, ann(1, rating=5), ann(2, rating=4), ann(3, rating=1)),
                                task(2, ann(1, rating=2), ann(2, rating=3), ann(3, rating=3))])
    # task 1: 5 vs median(4, 1) = 2.5 -> off; 4 vs median(5, 1) = 3 -> agrees; 1 vs 4.5 -> off. Task 2: all agree.
    assert rep["rater_agreement"] == {1: {"tasks": 2, "agree": 1, "rate": 0.5},
                                      3: {"tasks": 2, "agree": 1, "rate": 0.5},
                                      2: {"tasks": 2, "agree": 2, "rate": 1.0}}
