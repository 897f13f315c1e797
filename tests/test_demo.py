"""The main job end to end in --fast mode: every stage runs, the adapter loads into diffusers, reruns resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from align.demo import main as demo_main
from align.workflows.config import load_workflow_config

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
    for heading in ("## OCR reward on the demo prompts", "## Samples", "## Curves", "## Metrics", "## The adapter",
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


def test_rerun_skips_completed_stages(demo_run: Path, capsys):
    sft_adapter = demo_run / "sft" / "pytorch_lora_weights.safetensors"
    mtime = sft_adapter.stat().st_mtime_ns
    assert demo_main(["--fast", "--output_dir", str(demo_run)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == len(STAGES)
    assert sft_adapter.stat().st_mtime_ns == mtime  # nothing retrained


def test_config_errors_are_one_line(tmp_path: Path, capsys):
    assert demo_main(["--config", str(tmp_path / "missing.yaml"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("slogans: [SALE]\ncaption: no placeholder\nsize: 64\nmodel: {}\nsft: {}\npairs: {}\ndpo_grpo: {}\neval: {}\n")
    with pytest.raises(ValueError, match="caption must contain"):
        load_workflow_config(bad)
