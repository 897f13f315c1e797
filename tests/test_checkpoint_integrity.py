"""``--resume_from_checkpoint`` never resumes an incomplete or foreign checkpoint: real one-step checkpoints of SFT,
DPO and GRPO, then each file of one removed (and truncated), and each objective's checkpoint under every other
objective, another LoRA rank, another finetune mode and another model kind. Every refusal is one ``error:`` line,
exit 2, before any weights load (so the cases cost well under a second each)."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from align.checkpoints import MANIFEST_NAME, read_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
COMMON = ["--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none",
          "--validation_prompts", "[]", "--logging_steps", "1"]


def _main(objective: str):
    return importlib.import_module(f"align.{objective}").main


def _run(objective: str, argv: list[str], capsys) -> tuple[int, str]:
    from align.launch import run_main

    capsys.readouterr()
    code = run_main(_main(objective), argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[str]]:
    """objective -> the arguments of its tiny run (the checkpoint-1 of each is under ``<output_dir>``)."""
    root = tmp_path_factory.mktemp("ckpt")
    sft = root / "sft_data"
    sft.mkdir()
    pairs = root / "pairs"
    pairs.mkdir()
    rows, pair_rows = [], []
    for i in range(2):
        for folder, name in ((sft, f"{i}.png"), (pairs, f"c{i}.png"), (pairs, f"r{i}.png")):
            value = np.random.default_rng(hash(name) % 1000 + i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(value).save(folder / name)
        rows.append({"file_name": f"{i}.png", "prompt": f"a sign {i}", "ratings": [5, 5, 5]})
        pair_rows.append({"prompt": f"a sign {i}", "chosen": f"c{i}.png", "rejected": f"r{i}.png", "votes": [3, 0]})
    (sft / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pairs / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows))
    args = {
        "sft": ["--config", str(TINY / "sft_lora.yaml"), "--dataset_name", str(sft), "--cache_dir", str(root / "c")],
        "dpo": ["--config", str(TINY / "dpo_lora.yaml"), "--dataset_name", str(pairs), "--eval_fraction", "0",
                "--eval_strategy", "no", "--per_device_train_batch_size", "2", "--cache_dir", str(root / "c")],
        "grpo": ["--config", str(TINY / "grpo_brightness.yaml"), "--train_prompts", "a cat", "a dog",
                 "--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--num_inference_steps", "2"],
    }
    from align.launch import run_main

    for objective, argv in args.items():
        out = root / f"run_{objective}"
        # `last` on an output_dir that holds no run starts a new one (no circle of messages).
        code = run_main(_main(objective), [*argv, *COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "last"])
        assert code == 0, objective
        assert read_manifest(out / "checkpoint-1")["objective"] == objective
    return {objective: argv + ["--output_dir", str(root / f"run_{objective}")] for objective, argv in args.items()}


def _output_dir(argv: list[str]) -> Path:
    return Path(argv[argv.index("--output_dir") + 1])


def _copy_run(runs, objective: str, to: Path) -> Path:
    shutil.copytree(_output_dir(runs[objective]) / "checkpoint-1", to / "checkpoint-1")
    return to / "checkpoint-1"


def _one_error(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def _with_output_dir(argv: list[str], out: Path) -> list[str]:
    i = argv.index("--output_dir")
    return [*argv[:i], "--output_dir", str(out), *argv[i + 2:]]


def test_the_manifest_lists_every_file_and_the_run(runs):
    ckpt = _output_dir(runs["sft"]) / "checkpoint-1"
    manifest = read_manifest(ckpt)
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= on_disk
    assert manifest["model_kind"] == "t2i" and manifest["lora_rank"] == 4 and manifest["finetune"] == "lora"
    assert any(name.startswith("rollout_state") for name in read_manifest(_output_dir(runs["grpo"]) /
                                                                           "checkpoint-1")["files"])


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_last_never_resumes_a_checkpoint_with_a_file_missing_or_truncated(objective, runs, tmp_path, capsys, caplog):
    from align.launch import last_complete_checkpoint

    manifest = read_manifest(_output_dir(runs[objective]) / "checkpoint-1")
    broken = [(name, "missing") for name in [*manifest["files"], MANIFEST_NAME]]
    broken.append((next(n for n in manifest["files"] if n.endswith(".pt")), "truncated"))
    for i, (name, how) in enumerate(broken):
        out = tmp_path / f"o{i}"
        ckpt = _copy_run(runs, objective, out)
        if how == "missing":
            (ckpt / name).unlink()
        else:
            (ckpt / name).write_bytes((ckpt / name).read_bytes()[:10])
        assert last_complete_checkpoint(out) is None, name
        code, err = _run(objective, [*_with_output_dir(runs[objective], out), *COMMON[:2],
                                     "--resume_from_checkpoint", "last"], capsys)
        assert "but no complete checkpoint to resume" in _one_error(code, err), name
        code, err = _run(objective, [*_with_output_dir(runs[objective], tmp_path / f"n{i}"), *COMMON[:2],
                                     "--resume_from_checkpoint", str(ckpt)], capsys)
        line = _one_error(code, err)
        assert "is not a complete checkpoint" in line and (name in line or MANIFEST_NAME in line), line
        # An older complete checkpoint is resumed instead of the broken newer one.
        shutil.copytree(_output_dir(runs[objective]) / "checkpoint-1", out / "checkpoint-0")
        assert last_complete_checkpoint(out) == out / "checkpoint-0"


@pytest.mark.parametrize("mine, theirs", [(a, b) for a in ("sft", "dpo", "grpo") for b in ("sft", "dpo", "grpo")
                                          if a != b])
def test_a_checkpoint_of_another_objective_is_refused(mine, theirs, runs, tmp_path, capsys):
    ckpt = _copy_run(runs, theirs, tmp_path / "o")
    for resume in ("last", str(ckpt)):
        code, err = _run(mine, [*_with_output_dir(runs[mine], tmp_path / "o"), *COMMON[:2],
                                "--resume_from_checkpoint", resume], capsys)
        assert f"it is a {theirs} checkpoint and this is a {mine} run" in _one_error(code, err)


@pytest.mark.parametrize("override, expected", [
    (["--lora_rank", "8"], "trained with lora_rank 4, this run has --lora_rank 8"),
    (["--tiny_variant", "edit-2509"], "trained on a text-to-image model, this run's model is an edit model"),
    (["--finetune", "full"], "its finetune is 'lora', this run's is 'full'"),
    (["--tiny_seed", "3"], "its model is 'tiny-seed0', this run's is 'tiny-seed3'"),
])
def test_a_checkpoint_of_another_rank_kind_mode_or_model_is_refused(override, expected, runs, tmp_path, capsys):
    _copy_run(runs, "sft", tmp_path / "o")
    code, err = _run("sft", [*_with_output_dir(runs["sft"], tmp_path / "o"), *COMMON[:2], *override,
                             "--resume_from_checkpoint", "last"], capsys)
    assert expected in _one_error(code, err)


def test_a_complete_checkpoint_of_the_same_run_resumes(runs, tmp_path, capsys):
    _copy_run(runs, "sft", tmp_path / "o")
    code, err = _run("sft", [*_with_output_dir(runs["sft"], tmp_path / "o"), *COMMON[:2], "--resume_from_checkpoint",
                             "last"], capsys)
    assert code == 0, err


def test_init_adapter_logs_what_it_loads_and_trains_it(runs, tmp_path, capsys, caplog):
    """``--init_adapter`` of a matching rank trains on: one log line with the path, layout, rank / alpha and that
    the reference is the base model + the adapter."""
    import logging

    adapter = _output_dir(runs["dpo"]) / "pytorch_lora_weights.safetensors"
    with caplog.at_level(logging.INFO, logger="align"):
        code, err = _run("sft", [*_with_output_dir(runs["sft"], tmp_path / "o"), "--max_steps", "1",
                                 "--init_adapter", str(adapter)], capsys)
    assert code == 0, err
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("init_adapter:")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert str(adapter) in lines[0] and "diffusers layout" in lines[0] and "rank 4, alpha 4" in lines[0]
    assert "the base model + this adapter" in lines[0]
