"""Flow-DPO on the tiny Edit-2511 model: edit pairs (instruction, control image, chosen, rejected) go through the
conditioning seam; held-out implicit accuracy rises from chance."""

import json
from pathlib import Path

import pytest

from align.data.edit import load_edit_preference_dataset, write_synthetic_edit_pairs

ROOT = Path(__file__).resolve().parents[1]


def test_edit_pairs_with_bad_controls_are_a_clear_error(tmp_path):
    folder = write_synthetic_edit_pairs(tmp_path / "pairs", n=3, size=32)
    pairs, _ = load_edit_preference_dataset(str(folder))
    assert len(pairs) == 3 and all(len(c) == 1 for c in pairs["control_images"])
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["control_image"] = "gone.png"
    rows[2]["control_images"] = ["s0.png"] * 4
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="both") as info:  # numbered and list columns at once
        load_edit_preference_dataset(str(folder))
    del rows[2]["control_images"]
    rows[2]["control_image"] = None
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"2 pair\(s\) with bad control images: row 1: control image 1: image not "
                                         r"found.*row 2: no control image") as info:
        load_edit_preference_dataset(str(folder))
    assert "\n" not in str(info.value)


def test_edit_dpo_learns_the_preference(tmp_path):
    from align.dpo import main

    data = write_synthetic_edit_pairs(tmp_path / "data", n=16, size=32)
    trainer = main(["--config", str(ROOT / "recipes/tiny/edit_dpo_lora.yaml"), "--dataset_name", str(data),
                    "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
                    "--eval_fraction", "0.375", "--per_device_train_batch_size", "2",
                    "--per_device_eval_batch_size", "3", "--max_steps", "20", "--eval_on_start", "true",
                    "--eval_steps", "10", "--logging_steps", "5"])
    assert trainer.qwen.edit_model and trainer.qwen.transformer.config.zero_cond_t
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["references"].shapes == [(1, 4, 4)]  # the 32x32 source at the tiny reference area (64x64 px)
    evals = [h for h in trainer.state.log_history if "eval_rewards/accuracies" in h]
    assert len(evals) >= 3
    assert evals[0]["eval_rewards/accuracies"] <= 0.5  # policy == reference
    assert evals[-1]["eval_rewards/accuracies"] >= 0.8 and evals[-1]["eval_rewards/margins"] > 0
