"""``python -m align.datatools tiny-data KIND`` writes the data a tiny recipe reads, where it reads it, and the tiny
recipes save checkpoints, so the README's ``--resume_from_checkpoint last`` can be tried on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted((ROOT / "recipes" / "tiny").glob("*.yaml"))


@pytest.mark.parametrize("recipe", TINY, ids=[p.stem for p in TINY])
def test_every_tiny_recipe_saves_checkpoints_a_resume_can_use(recipe):
    values = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    assert values["save_strategy"] == "steps", recipe.name
    assert 0 < values["save_steps"] <= values["max_steps"], recipe.name  # at least one checkpoint in a full run
    assert values["save_total_limit"] >= 1


def test_tiny_edit_data_command_feeds_the_edit_sft_recipe_which_resumes_with_last(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    made = subprocess.run([sys.executable, "-m", "align.datatools", "tiny-data", "edit_sft", "-n", "4"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0 and "data/tiny_edit" in made.stdout, made.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "data/tiny_edit/metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((tmp_path / "data/tiny_edit" / r["control_image"]).is_file() for r in rows)

    from align.sft import main

    monkeypatch.chdir(tmp_path)  # the recipe's dataset_name (data/tiny_edit) and output_dir are relative
    recipe = str(ROOT / "recipes/tiny/edit_sft_lora.yaml")
    first = main(["--config", recipe, "--max_steps", "5"])  # stopped half way: the recipe's save_steps is 5
    out = Path(first.args.output_dir)
    assert first.state.global_step == 5 and (out / "checkpoint-5").is_dir()
    # The recipe as written (its max_steps 10), continuing that run from its newest checkpoint.
    resumed = main(["--config", recipe, "--resume_from_checkpoint", "last"])
    assert resumed.args.resume_from_checkpoint == str(out / "checkpoint-5") and resumed.state.global_step == 10
    assert (out / "checkpoint-10").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
