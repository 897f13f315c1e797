"""Diffusion-KTO from per-image ratings on the tiny model: labels from three raters (thresholds, middle band dropped
and counted), every bad input a one-line error before the model loads, implicit rewards exactly 0 before any update
(bf16 too), held-out implicit accuracy rising on rated renders, edit KTO, the combined objective's KTO term, and a
kill -9 resume that ends bit-identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import ADAPTER, ROOT, assert_same_adapter, child_env, complete_checkpoints, kill_at_checkpoint, run_ok
from safetensors.torch import load_file

from align.configs.kto import KTOConfig
from align.data.kto import LABEL_COLUMN, label_by_ratings, load_kto_rows, write_synthetic_ratings
from align.launch import parse_config, run_main

RECIPE = str(ROOT / "recipes/tiny/kto_lora.yaml")
ENV = child_env(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true")


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    """48 rated renders (bright: 4-5 stars, dark: 1-2, mid-grey: 3) and one encoding cache for the module."""
    root = tmp_path_factory.mktemp("kto")
    return write_synthetic_ratings(root / "data", n=48, size=32), root / "cache"


def _config(tmp_path, *extra: str) -> KTOConfig:
    return parse_config(KTOConfig, ["--config", RECIPE, "--output_dir", str(tmp_path), *extra])


def _rows(folder: Path, rows: list[dict], summary: dict | None = None) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(len(rows)):
        Image.new("RGB", (32, 32), (40 * i % 255, 90, 200)).save(folder / f"{i}.png")
    lines = [json.dumps({"file_name": f"{i}.png", "prompt": f"a sign {i}", **r}) + "\n" for i, r in enumerate(rows)]
    (folder / "metadata.jsonl").write_text("".join(lines), encoding="utf-8")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("recipe", ["kto_lora.yaml", "tiny/kto_lora.yaml"])
def test_recipes_parse_and_kto_is_an_objective(recipe, tmp_path):
    from align.objectives import get_objective, memory_terms

    config = parse_config(KTOConfig, ["--config", str(ROOT / "recipes" / recipe), "--output_dir", str(tmp_path),
                                      "--bf16", "false", "--report_to", "none"])
    assert config.beta == 1000.0 and config.desirable_threshold == 4.5 and config.undesirable_threshold == 2.0
    assert get_objective("kto").resolved("config_class") is KTOConfig
    terms = memory_terms(config)
    assert terms.label == "kto" and terms.graphs == (config.per_device_train_batch_size,) and terms.reference


def test_labels_thresholds_middle_band_and_rater_filter(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"file_name": [f"{i}.png" for i in range(6)],
                            "ratings": [[5, 5, 4], [4, 4, 5], [2, 2, 2], [1, 3, 1], [3, 3, 3], [5, 5]]})
    config = _config(tmp_path, "--dataset_name", "x")
    out, report = label_by_ratings(ds, config)
    # mean 4.67 desirable; 4.33 middle; 2.0 exactly at the threshold: undesirable; 1.67 undesirable; 3 middle; 2 raters
    assert out["file_name"] == ["0.png", "2.png", "3.png"] and out[LABEL_COLUMN] == [True, False, False]
    assert report.dropped == {"middle_band": 2, "too_few_ratings": 1} and report.kept == 3
    assert "desirable: mean >= 4.5 (1), undesirable: mean <= 2 (2)" in report.summary()
    # min aggregate, two raters, a lower desirable threshold: 2 now counts, 4.33 -> min 4 desirable
    config = _config(tmp_path, "--dataset_name", "x", "--rating_aggregate", "min", "--min_raters", "2",
                     "--desirable_threshold", "4")
    out, report = label_by_ratings(ds, config)
    assert out[LABEL_COLUMN] == [True, True, False, False, True] and report.dropped == {"middle_band": 1}


def test_a_rating_pull_is_read_as_it_is(rated):
    data, _ = rated
    config = parse_config(KTOConfig, ["--config", RECIPE, "--dataset_name", str(data), "--output_dir", "/tmp/unused"])
    rows, report = load_kto_rows(config)
    assert report.total == 48 and report.dropped == {"middle_band": 8}
    assert sum(rows[LABEL_COLUMN]) == 20 and len(rows) == 40


# ------------------------------------------------------------------------------------------------ bad inputs
GOOD = [{"ratings": [5, 5, 5]}, {"ratings": [1, 1, 2]}]
BAD_INPUTS = [
    ("no-rating-column", [{"x": 1}, {"x": 2}], None, [], "has no 'ratings' column"),
    ("pair-project-pull", GOOD, {"kind": "pairs", "votes_per_rater": {"1": 2}}, [], "not a rating project"),
    ("pairs-not-ratings", [{"chosen": "0.png", "rejected": "1.png"}] * 2, None, [], "holds preference pairs"),
    ("outside-scale", [{"ratings": [5, 7, 5]}, GOOD[1]], None, [], "outside the rating scale [1, 5]"),
    ("all-middle-band", [{"ratings": [3, 3, 4]}, {"ratings": [3, 2, 3]}], None, [], "fall between the thresholds"),
    ("only-desirable", [GOOD[0], GOOD[0], {"ratings": [3, 3, 3]}], None, [], "only desirable images"),
    ("one-rater-pull", [{"ratings": [5]}, {"ratings": [1]}], {"kind": "ratings", "votes_per_rater": {"7": 2}}, [],
     "rated by 1 rater(s) but min_raters is 3"),
    ("one-rater-folder", [{"ratings": [5]}, {"ratings": [1]}], None, [], "no image has 3 ratings (at most 1"),
    ("thresholds-crossed", GOOD, None, ["--undesirable_threshold", "4.6"], "must be below desirable_threshold"),
]


@pytest.mark.parametrize("case, rows, summary, extra, expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_before_the_model_loads(case, rows, summary, extra, expected, tmp_path, capsys,
                                                      monkeypatch):
    import align.launch
    from align.kto import main

    def no_model(config):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr("align.modeling.load_qwen_image", no_model)
    data = _rows(tmp_path / "data", rows, summary)
    code = run_main(main, ["--config", RECIPE, "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert align.launch  # the run skeleton is the one the CLI launches


@pytest.mark.slow
def test_qwen_image_align_kto_bad_input_through_the_cli(tmp_path):
    data = _rows(tmp_path / "data", [{"ratings": [5]}, {"ratings": [1]}], {"kind": "ratings", "votes_per_rater": {"7": 2}})
    proc = subprocess.run([sys.executable, "-m", "align.cli", "kto", "--config", RECIPE, "--num_processes", "1",
                           "--dataset_name", str(data), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rated by 1 rater(s) but min_raters is 3" in errors[0]


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("finetune, dtype", [("lora", "float32"), ("lora", "bfloat16"), ("full", "bfloat16")])
def test_implicit_rewards_are_zero_before_any_update(finetune, dtype, rated, tmp_path):
    from align.data.kto import build_kto_datasets
    from align.modeling import load_qwen_image
    from align.trainers.kto import KTOTrainer

    data, cache = rated
    config = _config(tmp_path, "--dataset_name", str(data), "--cache_dir", str(cache), "--finetune", finetune,
                     "--model_dtype", dtype, "--eval_fraction", "0", "--eval_strategy", "no",
                     "--per_device_train_batch_size", "8")
    qwen = load_qwen_image(config)
    train, _ = build_kto_datasets(config, qwen)
    trainer = KTOTrainer(qwen, config, train_dataset=train)
    assert trainer.qwen.transformer.dtype == getattr(torch, dtype)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss, metrics, reward, desirable = trainer.kto(trainer.model, batch)
    assert desirable.any() and (~desirable).any()
    assert torch.equal(reward, torch.zeros_like(reward))  # exactly: the same forward, not "close"
    assert metrics["rewards/desirable"] == 0 and metrics["rewards/undesirable"] == 0 and metrics["kl"] == 0
    assert float(loss) == pytest.approx(0.5)  # 1 - sigmoid(0)


def test_kto_learns_which_renders_the_raters_liked(rated, tmp_path):
    from align.kto import main

    data, cache = rated
    trainer = main(["--config", RECIPE, "--dataset_name", str(data), "--cache_dir", str(cache),
                    "--output_dir", str(tmp_path), "--max_steps", "30", "--eval_on_start", "true",
                    "--logging_steps", "10", "--shared_noise", "true"])
    evals = [h for h in trainer.state.log_history if "eval_rewards/accuracies" in h]
    assert len(evals) >= 3
    assert evals[0]["eval_rewards/accuracies"] <= 0.5  # policy == reference: no reward yet
    assert evals[-1]["eval_rewards/accuracies"] >= 0.8
    train = [h for h in trainer.state.log_history if "loss/kto" in h and "eval_loss" not in h]
    assert {"rewards/desirable", "rewards/undesirable", "rewards/margins", "rewards/accuracies", "kl"} <= set(train[-1])
    summary = json.loads((tmp_path / "data_summary.json").read_text())
    assert summary["dropped"] == {"middle_band": 8} and summary["kept"] == 40
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_edit_kto_trains_a_step(tmp_path):
    from align.kto import main

    data = write_synthetic_ratings(tmp_path / "data", n=8, size=32, edit=True)
    trainer = main(["--config", RECIPE, "--tiny_variant", "edit-2511", "--dataset_name", str(data),
                    "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--eval_fraction", "0",
                    "--eval_strategy", "no", "--logging_steps", "1", "--kl_estimate", "mismatched"])
    assert trainer.qwen.edit_model and trainer.state.global_step == 2
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["references"].shapes == [(1, 4, 4)]
    logged = [h for h in trainer.state.log_history if "loss/kto" in h]
    assert logged and all(torch.isfinite(torch.tensor(h["loss/kto"])) for h in logged)


def test_combined_objective_with_a_kto_term(rated, tmp_path):
    """DPO on pairs + KTO on ratings (+ the velocity KL) in align/dpo.py: both terms train and are logged; the
    rated batches' position is saved in the checkpoint."""
    from align.data.preference import write_synthetic_pairs
    from align.dpo import main

    data, _ = rated
    pairs = write_synthetic_pairs(tmp_path / "pairs", n=8, size=32)
    trainer = main(["--config", str(ROOT / "recipes/tiny/dpo_lora.yaml"), "--dataset_name", str(pairs),
                    "--output_dir", str(tmp_path / "out"), "--w_kto", "0.5", "--kto_dataset_name", str(data),
                    "--beta_kl", "0.1", "--kto_batch_size", "4", "--max_steps", "3", "--eval_fraction", "0",
                    "--eval_strategy", "no", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3"])
    train = [h for h in trainer.state.log_history if "loss/kto" in h]
    assert len(train) == 3 and all({"loss/dpo", "loss/kl", "kto/rewards/margins"} <= set(h) for h in train)
    assert trainer.rated.position == 12 or trainer.rated.epoch > 0
    state = torch.load(tmp_path / "out/checkpoint-3/kto_state_0.pt")
    assert state == {"epoch": 0, "position": 12}


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_kill_9_and_resume_last_is_bit_identical(rated, tmp_path):
    data, cache = rated
    cmd = [sys.executable, "align/kto.py", "--config", RECIPE, "--dataset_name", str(data), "--cache_dir", str(cache),
           "--max_steps", "5", "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no",
           "--disable_tqdm", "true", "--logging_steps", "1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_ok([*cmd, "--output_dir", str(full)], ENV)

    proc = subprocess.Popen([*cmd, "--output_dir", str(killed)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, killed, 2, poll=0.02)
    assert not (killed / ADAPTER).exists()
    run_ok([*cmd, "--output_dir", str(killed), "--resume_from_checkpoint", "last"], ENV)
    a = assert_same_adapter(full, killed)
    first = load_file(complete_checkpoints(full)[0] / ADAPTER)
    assert any(not torch.equal(a[k], first[k]) for k in a)  # it trained after the first checkpoint
