"""The benchmark scripts run (numbers are printed, never asserted: speed is not a test)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_scale_skips_without_gpu_and_runs_a_reduced_config(capsys):
    gpu_scale = _load("gpu_scale")
    gpu_scale.main([])
    out = capsys.readouterr().out
    assert "20.43 B parameters" in out  # the real config, counted on the meta device
    assert "skipping" in out
    gpu_scale.main(["--allow_cpu", "--layers", "1", "--heads", "2", "--head_dim", "32", "--joint_dim", "64",
                    "--resolution", "32", "--text_len", "4", "--rollout_steps", "2", "--train_timesteps", "1",
                    "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    for row in ("LoRA SFT step", "Flow-DPO step", "GRPO step"):  # the trainers' own steps
        assert row in out
    assert out.count("METRIC\t") == 3


def test_edit_step_benchmark_prints_the_edit_over_t2i_ratio(capsys):
    edit_step = _load("edit_step")
    edit_step.main(["--steps", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    ratio = [line for line in out.splitlines() if line.startswith("METRIC\tedit sft: edit / T2I")]
    assert len(ratio) == 1 and float(ratio[0].split("\t")[2]) > 0


@pytest.mark.slow  # it launches the demo's SFT and DPO processes (the smallest setting: one of each)
def test_active_selection_dpo_smallest_setting_writes_the_table_and_json(tmp_path, capsys):
    bench = _load("active_selection_dpo")
    out = tmp_path / "bench"
    # budget == seed set: both strategies send the same pair, so one DPO run serves both (and is reused)
    result = bench.main(["--fast", "--out", str(out), "--seeds", "1", "--budgets", "1", "--seed_set", "1",
                         "--dpo_steps", "1"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["table"] == result["table"]
    assert [(r["strategy"], r["budget"], r["seed"]) for r in saved["runs"]] == [("random", 1, 0), ("uncertain", 1, 0)]
    assert saved["runs"][1]["same_run_as"] == "random_n1"
    head = saved["preference_heads"]["0"]  # the chooser's record: trained on the labelled seed pair
    assert head["trained_on"] <= 1 and head["pool_pairs"] >= head["labelled_pool_pairs"]
    rows = saved["table"]
    assert [(r["budget"], r["prompts"]) for r in rows] == [(1, "train"), (1, "heldout")]
    for row in rows:
        assert row["uncertain - random"]["per_seed"] == [0.0]  # the same pairs: the same model
        for s in ("random", "uncertain"):
            assert len(row[s]["per_seed"]) == 1 and -1.0 <= row[s]["mean"] <= 1.0
    table = [line for line in printed.splitlines() if line.startswith("| 1 |")]
    assert len(table) == 2 and all(line.count("|") == 6 for line in table)  # 5 columns
    # A rerun skips the finished runs (resumable) and gives the same table.
    again = bench.main(["--fast", "--out", str(out), "--seeds", "1", "--budgets", "1", "--seed_set", "1",
                        "--dpo_steps", "1"])
    assert "done before, skipped" in capsys.readouterr().out
    assert again["table"] == result["table"]


def test_workflow_subset_for_benchmarks_names_a_missing_or_unknown_stage(tmp_path):
    from align.workflows.brand_adapter import run_workflow
    from align.workflows.config import load_workflow_config

    cfg = load_workflow_config("recipes/demo/brand_adapter.yaml", fast=True)
    with pytest.raises(ValueError, match="'sft' reads stage 'data'"):
        run_workflow(cfg, tmp_path / "a", only=("sft",))
    with pytest.raises(ValueError, match="no workflow stage named 'nope'"):
        run_workflow(cfg, tmp_path / "b", only=("data", "nope"))
    assert not any(p.is_dir() for p in (tmp_path / "a").iterdir())  # refused before any stage ran
