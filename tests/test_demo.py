"""The main job end to end in --fast mode: every stage runs, the adapter loads into diffusers, reruns resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from align.demo import main as demo_main
from align.workflows.config import load_workflow_config

pytestmark = pytest.mark.slow  # processes / long runs: `-m "not slow"` skips them

STAGES = ("data", "base_model", "eval_before", "sft", "eval_sft", "pairs", "dpo_grpo", "eval_aligned", "adapter")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert demo_main(["--fast", "--output_dir", str(out)]) == 0
    return out


def test_stages_complete(demo_run: Path):
    for stage in STAGES:
        marker = demo_run / stage / "stage_done.json"
        assert marker.is_file(), stage
    data = json.loads((demo_run / "data" / "stage_done.json").read_text())
    assert data["kept_by_raters"] < data["images"]  # the rater filter has low-rated renders to drop
    summary = json.loads((demo_run / "sft" / "data_summary.json").read_text())
    assert summary["kept"] == data["kept_by_raters"]
    rows = [json.loads(x) for x in (demo_run / "pairs" / "metadata.jsonl").read_text().splitlines()]
    assert rows and all({"prompt", "chosen", "rejected", "votes"} <= set(r) for r in rows)
    assert all((demo_run / "pairs" / r["chosen"]).is_file() for r in rows)
    assert list((demo_run / "wandb").glob("offline-run-*")), "wandb offline runs missing"


def test_adapter_loads_into_diffusers(demo_run: Path):
    import torch
    from diffusers import QwenImagePipeline

    adapter = demo_run / "adapter"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    assert (adapter / "pytorch_lora_weights_comfyui.safetensors").is_file()
    pipe = QwenImagePipeline.from_pretrained(str(demo_run / "base_model" / "model"))
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(str(adapter), adapter_name="brand")
    lora = [n for n, _ in pipe.transformer.named_parameters() if "lora_" in n]
    assert lora and any(torch.count_nonzero(p) for n, p in pipe.transformer.named_parameters() if "lora_B" in n)
    assert set(before) <= {n.replace(".base_layer", "") for n, _ in pipe.transformer.named_parameters()}


def test_report(demo_run: Path):
    report = (demo_run / "report.md").read_text(encoding="utf-8")
    for heading in ("## OCR gain per stage, on held-out seeds", "## Learning signal", "## Samples", "## Curves", "## Metrics", "## The adapter",
                    "## Commands each stage ran"):
        assert heading in report
    assert "accelerate launch" in report and "align/sft.py" in report and "align/dpo.py" in report
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(images) >= 6
    for rel in images:
        with Image.open(demo_run / rel) as img:
            assert img.size[0] > 0
    for stage in ("eval_before", "eval_sft", "eval_aligned"):
        scores = json.loads((demo_run / stage / "scores.json").read_text())
        assert 0.0 <= scores["ocr_mean"] <= 1.0 and scores["per_prompt"]
        assert scores["seeds"] == [1000, 1001]  # held out: the pairs were generated with seeds 0, 1, ...
        assert all(len(p["ocr"]) == 2 for p in scores["per_prompt"] + scores["heldout"]["per_prompt"])
        train_prompts = {p["prompt"] for p in scores["per_prompt"]}
        assert train_prompts.isdisjoint(p["prompt"] for p in scores["heldout"]["per_prompt"])
    gains = json.loads((demo_run / "report" / "gains.json").read_text())
    assert set(gains) == {"train/sft", "train/aligned", "heldout/sft", "heldout/aligned"}
    for g in gains.values():
        o = g["overall"]
        assert o["low"] <= o["gain"] <= o["high"] and len(g["per_prompt"]) == o["n_prompts"]
    # The demo's online term is DiffusionNFT: the report names the stage after it and reads NFT's metrics.
    assert "95 %" in report and "DPO+NFT over SFT" in report and "DPO+GRPO" not in report.replace("DPO+GRPO gain", "")
    assert "NFT OCR reward of rollouts" in report and "`grad_norm/nft`" in report
    # The over-optimisation monitor ran on the held-out prompts during the stage and its evaluation is tabulated.
    assert "## Over-optimisation monitor (DPO+NFT, held-out prompts)" in report
    state = json.loads((demo_run / "dpo_grpo" / "trainer_state.json").read_text())
    assert any("eval_reward" in r and "eval_kl_ref" in r for r in state["log_history"])


def test_rerun_skips_completed_stages(demo_run: Path, capsys):
    sft_adapter = demo_run / "sft" / "pytorch_lora_weights.safetensors"
    mtime = sft_adapter.stat().st_mtime_ns
    assert demo_main(["--fast", "--output_dir", str(demo_run)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == len(STAGES)
    assert sft_adapter.stat().st_mtime_ns == mtime  # nothing retrained


def test_a_config_change_redoes_the_stages_that_read_it(demo_run: Path, capsys, tmp_path: Path):
    import yaml

    from align.workflows.config import REPO_ROOT

    cfg = yaml.safe_load((REPO_ROOT / "recipes/demo/brand_adapter.yaml").read_text(encoding="utf-8"))
    cfg["fast"]["eval"]["num_inference_steps"] = 3
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    sft_adapter = demo_run / "sft" / "pytorch_lora_weights.safetensors"
    mtime = sft_adapter.stat().st_mtime_ns
    assert demo_main(["--fast", "--config", str(changed), "--output_dir", str(demo_run)]) == 0
    printed = capsys.readouterr().out
    redone = [line.split("] ")[1].split(":")[0] for line in printed.splitlines() if "redoing" in line]
    assert redone == ["evaluate before SFT", "evaluate after SFT", "evaluate after alignment"]
    assert printed.count("skipped") == len(STAGES) - 3
    assert sft_adapter.stat().st_mtime_ns == mtime
    # and back: the original config redoes the evaluations again instead of reusing the 3-step ones
    assert demo_main(["--fast", "--output_dir", str(demo_run)]) == 0
    assert capsys.readouterr().out.count("redoing") == 3


def test_stage_markers_are_keyed_on_inputs(tmp_path: Path, capsys):
    from align.workflows.stages import run_stage, stage_key

    calls = []

    def work():
        calls.append(1)
        (tmp_path / "s" / f"out{len(calls)}.txt").write_text("x")
        return {"n": len(calls)}

    k1, k2 = stage_key({"steps": 1}), stage_key({"steps": 2})
    assert k1 == stage_key({"steps": 1}) and k1 != k2 and stage_key({"steps": 1}, ["up"]) != k1
    assert run_stage(1, 1, "s", tmp_path / "s", work, key=k1)["n"] == 1
    assert run_stage(1, 1, "s", tmp_path / "s", work, key=k1)["skipped"]
    again = run_stage(1, 1, "s", tmp_path / "s", work, key=k2)
    assert again["n"] == 2 and not again["skipped"] and again["inputs_key"] == k2
    assert not (tmp_path / "s" / "out1.txt").exists()  # the other config's outputs were cleared
    assert "other inputs" in capsys.readouterr().out


def test_learning_signal_notes_say_when_a_term_had_no_signal():
    from align.workflows.report import learning_signal_notes

    dead = [{"step": i, "grpo/frac_reward_zero_std": 1.0, "grpo/advantages/abs_mean": 0.0, "loss/grpo": 1e-9,
             "grpo/reward": 0.97, "rewards/accuracies": 1.0} for i in range(1, 5)]
    text = " ".join(learning_signal_notes(dead))
    assert "100% of the groups had zero reward spread" in text and "no learning signal" in text
    assert "saturated" in text and "headroom" in text
    alive = [{"step": i, "grpo/frac_reward_zero_std": 0.25, "grpo/advantages/abs_mean": 0.8, "loss/grpo": 1e-9,
              "grpo/reward": 0.5, "rewards/accuracies": 0.6} for i in range(1, 5)]
    text = " ".join(learning_signal_notes(alive))
    assert "no learning signal" not in text and "saturated" not in text and "by construction" in text


def test_monitor_section_tabulates_the_held_out_evaluations():
    from align.workflows.report import monitor_section

    assert monitor_section([{"step": 1, "loss": 0.5}]) == []  # no monitor: no section
    hist = [{"step": 1, "grpo/reward": 0.2, "grpo/frac_reward_zero_std": 0.5},
            {"step": 2, "grpo/reward": 0.4, "grpo/frac_reward_zero_std": 0.0},
            {"step": 2, "eval_reward": 0.30, "eval_kl_ref": 0.01, "eval_diversity": 0.2, "eval_overopt_flag": 0},
            {"step": 3, "grpo/reward": 0.9, "grpo/frac_reward_zero_std": 1.0},
            {"step": 3, "eval_reward": 0.10, "eval_kl_ref": 0.05, "eval_diversity": 0.1, "eval_overopt_flag": 1},
            {"step": 3, "eval_reward": 0.10, "eval_kl_ref": 0.05, "eval_diversity": 0.1, "eval_overopt_flag": 1}]
    lines = monitor_section(hist)
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["| 2 | 0.300 | 0.300 | 0.010 | 0.200 | 25% | 0 |",   # rollouts of steps 1-2 averaged
                    "| 3 | 0.100 | 0.900 | 0.050 | 0.100 | 100% | 1 |"]  # the repeated closing evaluation is dropped
    text = " ".join(lines)
    assert "step(s) 3" in text and "early_stop_patience" in text and "(not rising)" in text


def test_config_errors_are_one_line(tmp_path: Path, capsys):
    assert demo_main(["--config", str(tmp_path / "missing.yaml"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("slogans: [SALE]\ncaption: no placeholder\nsize: 64\nmodel: {}\nsft: {}\npairs: {}\ndpo_grpo: {}\neval: {}\n")
    with pytest.raises(ValueError, match="caption must contain"):
        load_workflow_config(bad)


def test_single_frame_convs_match_the_causal_3d_convs():
    import torch

    from align.workflows.vae_fit import single_frame_convs
    from qwen_image.tiny import tiny_vae

    vae = tiny_vae(0)
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).latent_dist.mode()).sample
        with single_frame_convs():
            fast = vae.decode(vae.encode(x).latent_dist.mode()).sample
        again = vae.decode(vae.encode(x).latent_dist.mode()).sample  # the patch is undone on exit
    assert torch.allclose(ref, fast, atol=1e-4)
    assert torch.equal(ref, again)


def test_auto_label_prefers_the_higher_reward(tmp_path: Path):
    from align.workflows.auto_label import label_pairs

    (tmp_path / "images").mkdir()
    for name, colour in (("a", 0), ("b", 128), ("c", 255)):
        Image.new("RGB", (16, 16), (colour,) * 3).save(tmp_path / "images" / f"{name}.png")
    cands = [{"image": f"images/{n}.png", "score": s} for n, s in (("a", 1.0), ("b", 0.0), ("c", 0.0))]
    (tmp_path / "candidates.jsonl").write_text("\n".join(json.dumps(c) for c in cands))
    pairs = [{"pair_id": "p1", "prompt": "x", "image_a": "images/b.png", "image_b": "images/a.png"},
             {"pair_id": "p2", "prompt": "x", "image_a": "images/b.png", "image_b": "images/c.png"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    out = label_pairs(tmp_path, raters=3, noise=0.0)
    rows = [json.loads(x) for x in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert out["labelled_pairs"] == 1 and out["ties_dropped"] == 1  # b vs c: the same OCR score
    assert rows[0]["chosen"] == "images/a.png" and rows[0]["rejected"] == "images/b.png"
    assert rows[0]["votes"] == [3, 0] and rows[0]["agreement"] == 1.0


def test_auto_label_all_ties_is_a_clear_error(tmp_path: Path):
    from align.workflows.auto_label import label_pairs

    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), "white").save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "candidates.jsonl").write_text("\n".join(json.dumps({"image": f"images/{n}.png", "score": 0.0}) for n in "ab"))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"pair_id": "p", "prompt": "x", "image_a": "images/a.png", "image_b": "images/b.png"}))
    with pytest.raises(ValueError, match="saw no difference in any pair"):
        label_pairs(tmp_path, noise=0.0)


def test_raters_abstain_below_the_tie_margin_and_need_a_majority():
    import random

    from align.workflows.auto_label import rater_votes

    rng = random.Random(0)
    assert rater_votes(0.5, 0.0, rng, raters=3, noise=0.0, tie_margin=0.1) == (3, 0)
    assert rater_votes(0.0, 0.5, rng, raters=3, noise=0.0, tie_margin=0.1) == (0, 3)
    assert rater_votes(0.05, 0.0, rng, raters=3, noise=0.0, tie_margin=0.1) == (0, 0)  # too close to tell
    # With noise, a 0.05 gap under a 0.1 margin rarely reaches a 2-of-3 majority; a 0.5 gap nearly always does.
    close = [rater_votes(0.05, 0.0, rng, noise=0.05) for _ in range(400)]
    far = [rater_votes(0.5, 0.0, rng, noise=0.05) for _ in range(400)]
    assert sum(max(v) >= 2 for v in close) < 0.25 * len(close)
    assert sum(v[0] >= 2 for v in far) == len(far)


def test_learning_signal_notes_read_the_gradient_shares():
    from align.workflows.report import gradient_share_notes, learning_signal_notes

    assert gradient_share_notes([{"step": 1, "loss": 0.5}]) == []  # no diagnostic logged: no note
    quiet = [{"step": i, "grad_norm/offline": 4.0, "grad_norm/grpo": 0.02} for i in range(1, 5)]
    text = " ".join(learning_signal_notes(quiet))
    assert "was 0.5% of the offline terms'" in text and "barely trains" in text and "about 100x" in text
    loud = [{"step": i, "grad_norm/offline": 3.0, "grad_norm/nft": 1.5} for i in range(1, 5)]
    (note,) = gradient_share_notes(loud)
    assert "`grad_norm/nft`" in note and "50.0%" in note and "barely" not in note
    dead = [{"step": 1, "grad_norm/offline": 2.0, "grad_norm/grpo": 0.0}]  # every group without reward spread
    assert "did not train at all" in gradient_share_notes(dead)[0]
    dead = [{"step": 1, "grad_norm/offline": 2.0, "grad_norm/grpo": 0.0}]  # every group without reward spread
    assert "did not train at all" in gradient_share_notes(dead)[0]


def test_learning_signal_notes_follow_the_logged_online_method():
    from align.workflows.report import aligned_label, learning_signal_notes, logged_online_method

    nft = [{"step": i, "nft/frac_reward_zero_std": 1.0, "nft/advantages/abs_mean": 0.0, "loss/nft": 1e-9,
            "nft/reward": 0.5, "rewards/accuracies": 0.6} for i in range(1, 5)]
    assert logged_online_method(nft) == "nft" and aligned_label("nft") == "DPO+NFT"
    assert logged_online_method([{"step": 1, "loss": 0.5}]) is None and aligned_label(None) == "DPO"
    text = " ".join(learning_signal_notes(nft))
    assert "NFT: 100% of the groups had zero reward spread" in text and "NFT had no learning signal" in text
    assert "GRPO" not in text and "by construction" not in text  # the ratio argument is Flow-GRPO's alone
