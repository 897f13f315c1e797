"""What a new user gets wrong, across every command line: each case must exit 2 with ONE ``error:`` line on stderr
that names the problem (file / row / option, and what to do), no traceback, and nothing valid deleted or changed.

Most cases run in-process through the same exit handling the scripts use (``align.launch.run_main``), and all of
them fail before a model loads, so the table is cheap; a few subprocess cases check the real entry points
(``python align/sft.py``, ``qwen-image-align`` through accelerate, ``python -m align.datatools``)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_helpers import launch_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
SFT, DPO, DPO_GRPO, GRPO = (str(TINY / n) for n in ("sft_lora.yaml", "dpo_lora.yaml", "dpo_grpo.yaml",
                                                        "grpo_brightness.yaml"))
EDIT_SFT = str(TINY / "edit_sft_lora.yaml")
KTO = str(TINY / "kto_lora.yaml")
# The smallest GRPO run that scores a few rollout batches (the reward cases stop it within its first step).
FAST_GRPO = ["--train_prompts", "a cat", "a dog", "--num_generations", "2", "--per_device_train_batch_size", "2",
             "--num_inference_steps", "2", "--max_steps", "3"]


# ---------------------------------------------------------------------------------------------------- fixtures
def _image(path: Path, size=(32, 32), value=120) -> None:
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _imagefolder(folder: Path, rows: list[dict], images=("a.png", "b.png", "c.png")) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(images):
        _image(folder / name, value=i)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def _pairs(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    for i in range(2):
        _image(folder / f"c{i}.png", value=10 + i)
        _image(folder / f"r{i}.png", value=20 + i)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


GOOD_ROWS = [{"file_name": "a.png", "prompt": "a red sign", "ratings": [5, 5, 5]},
             {"file_name": "b.png", "prompt": "a blue sign", "ratings": [5, 5, 4]},
             {"file_name": "c.png", "prompt": "a grey sign", "ratings": [1, 2, 1]}]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Every input the cases use; all of it is 'valid user data' that no failing command may touch."""
    root = tmp_path_factory.mktemp("bad_inputs")
    d = {"root": root}
    d["sft"] = _imagefolder(root / "sft", GOOD_ROWS)
    d["sft_five"] = _imagefolder(root / "sft_five", [{**GOOD_ROWS[0], "ratings": [5, "five", 5]}, *GOOD_ROWS[1:]])
    d["sft_badjson"] = _imagefolder(root / "sft_badjson", GOOD_ROWS[:1])
    with open(d["sft_badjson"] / "metadata.jsonl", "a") as fh:
        fh.write('{"file_name": "b.png", "prompt": \n')
    d["sft_missing_img"] = _imagefolder(root / "sft_missing_img",
                                        [*GOOD_ROWS[:2], {**GOOD_ROWS[0], "file_name": "gone.png"}])
    d["sft_corrupt"] = _imagefolder(root / "sft_corrupt", [*GOOD_ROWS[:2], {**GOOD_ROWS[0], "file_name": "bad.png"}])
    (d["sft_corrupt"] / "bad.png").write_bytes(b"not a png at all")
    d["sft_empty_prompt"] = _imagefolder(root / "sft_empty_prompt", [{**GOOD_ROWS[0], "prompt": "  "}, *GOOD_ROWS[1:]])
    d["sft_image_key"] = _imagefolder(root / "sft_image_key", [{**GOOD_ROWS[0], "image": "a.png"}])
    d["sft_no_rows"] = _imagefolder(root / "sft_no_rows", [])
    d["sft_scale"] = _imagefolder(root / "sft_scale", [{**GOOD_ROWS[0], "ratings": [5, 7, 5]}])
    d["sft_unrated"] = _imagefolder(root / "sft_unrated", [{k: v for k, v in r.items() if k != "ratings"}
                                                           for r in GOOD_ROWS])
    d["empty_dir"] = root / "empty_dir"
    d["empty_dir"].mkdir()
    good_pair = {"prompt": "a sign", "chosen": "c0.png", "rejected": "r0.png", "votes": [3, 0]}
    d["pairs"] = _pairs(root / "pairs", [good_pair, {**good_pair, "chosen": "c1.png", "rejected": "r1.png"}])
    d["pairs_no_rejected"] = _pairs(root / "pairs_no_rejected", [{"prompt": "a sign", "chosen": "c0.png"}])
    d["pairs_same"] = _pairs(root / "pairs_same", [{**good_pair, "rejected": "c0.png"}])
    d["pairs_nan"] = _pairs(root / "pairs_nan", [{**good_pair, "agreement": math.nan}])
    d["pairs_badjson"] = _pairs(root / "pairs_badjson", [good_pair])
    with open(d["pairs_badjson"] / "metadata.jsonl", "a") as fh:
        fh.write("{nope\n")
    d["pairs_novotes"] = _pairs(root / "pairs_novotes", [{k: v for k, v in good_pair.items() if k != "votes"}])
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "ok.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n', encoding="utf-8")
    (prompts / "empty.txt").write_text("", encoding="utf-8")
    (prompts / "blank.txt").write_text("\n  \n\n", encoding="utf-8")
    (prompts / "noprompt.jsonl").write_text('{"caption": "a cat"}\n', encoding="utf-8")
    (prompts / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": \n', encoding="utf-8")
    (prompts / "prompts.xml").write_text("<p>a cat</p>", encoding="utf-8")
    d["prompts"] = prompts
    edits = root / "edits"            # generate-pairs --edits requests (sources relative to the file)
    edits.mkdir()
    _image(edits / "src.png")
    (edits / "missing.jsonl").write_text('{"prompt": "add a hat", "control_image": "gone.png"}\n', encoding="utf-8")
    (edits / "four.jsonl").write_text(json.dumps({"prompt": "add a hat", "control_images": ["src.png"] * 4}) + "\n",
                                      encoding="utf-8")
    d["edits"] = edits
    recipes = root / "recipes"
    recipes.mkdir()
    (recipes / "syntax.yaml").write_text("learning_rate: 1e-4\nmax_steps: [1, 2\n", encoding="utf-8")
    (recipes / "typo.yaml").write_text("learnin_rate: 1.0e-4\n", encoding="utf-8")
    (recipes / "typo_dpo.yaml").write_text("bta: 10\n", encoding="utf-8")
    (recipes / "list.yaml").write_text("- learning_rate: 1\n", encoding="utf-8")
    d["recipes"] = recipes
    # A finished run (adapter + checkpoint) that a careless second run must not overwrite or resume into.
    prev = root / "previous_run"
    (prev / "checkpoint-3").mkdir(parents=True)
    (prev / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    _manifest(prev / "checkpoint-3", "sft")
    (prev / "pytorch_lora_weights.safetensors").write_bytes(b"the user's adapter")
    d["previous_run"] = prev
    far = root / "far_run"
    (far / "checkpoint-20").mkdir(parents=True)
    (far / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    _manifest(far / "checkpoint-20", "sft")
    d["far_run"] = far
    finished = root / "finished_run"  # save_strategy no: an adapter, no checkpoint to resume
    finished.mkdir()
    (finished / "pytorch_lora_weights.safetensors").write_bytes(b"the user's adapter")
    d["finished_run"] = finished
    half = root / "half_written"
    (half / "checkpoint-5").mkdir(parents=True)
    (half / "checkpoint-5" / "optimizer.pt").write_bytes(b"")
    (half / ".incomplete-checkpoint-6" / "checkpoint-6").mkdir(parents=True)
    d["half_written"] = half
    # ---- round 3: online rewards, checkpoints, LoRA files, model/data mismatches
    (root / "bad_rewards.py").write_text(BAD_REWARDS, encoding="utf-8")
    (root / "raising_rewards.py").write_text("raise RuntimeError('broken on purpose')\n", encoding="utf-8")
    edit_rows = [{**GOOD_ROWS[0], "control_image": "b.png"}, {**GOOD_ROWS[1], "control_image": "c.png"}]
    d["sft_edit"] = _imagefolder(root / "sft_edit", edit_rows)
    d["edit_four"] = _imagefolder(root / "edit_four", [
        {**r, "control_image_1": "a.png", "control_image_2": "b.png", "control_image_3": "c.png"} for r in edit_rows])
    d["edit_missing"] = _imagefolder(root / "edit_missing", [edit_rows[0], {**edit_rows[1], "control_image": "gone.png"}])
    d["edit_elongated"] = _imagefolder(root / "edit_elongated", [edit_rows[0], {**edit_rows[1], "control_image": "long.png"}])
    _image(d["edit_elongated"] / "long.png", size=(3000, 8))
    d["sft_long"] = _imagefolder(root / "sft_long", [GOOD_ROWS[0], {**GOOD_ROWS[1], "prompt": "a sign " * 3000},
                                                     GOOD_ROWS[2]])
    d["sft_int_prompt"] = _imagefolder(root / "sft_int_prompt", [GOOD_ROWS[0], {**GOOD_ROWS[1], "prompt": 5}])
    d["pairs_edit"] = _pairs(root / "pairs_edit", [{**good_pair, "control_image": "c1.png"}])
    d["pairs_long"] = _pairs(root / "pairs_long", [{**good_pair, "prompt": "a sign " * 3000},
                                                   {**good_pair, "chosen": "c1.png", "rejected": "r1.png"}])
    (prompts / "mixed.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": ["a", "dog"]}\n', encoding="utf-8")
    (prompts / "edit.jsonl").write_text('{"prompt": "add a hat", "control_image": "src.png"}\n' * 2, encoding="utf-8")
    (recipes / "demo_list.yaml").write_text("- slogans\n", encoding="utf-8")
    adapters = root / "adapters"
    adapters.mkdir()
    _lora(adapters / "r4.safetensors", rank=4, width=None)
    whole = (adapters / "r4.safetensors").read_bytes()
    (adapters / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    _lora(adapters / "r8.safetensors", rank=8, width=None)
    _lora(adapters / "other_size.safetensors", rank=4, width=3072)  # the real model's width, not the tiny one's
    (adapters / "lora.bin").write_bytes(b"a pickled state dict")
    (adapters / "two").mkdir()
    _lora(adapters / "two" / "a.safetensors", rank=4, width=None)
    _lora(adapters / "two" / "b.safetensors", rank=4, width=None)
    import torch
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2, 2)}, adapters / "no_lora.safetensors")
    save_file({"lora_unet_transformer_blocks_0_attn_to_q.lokr_w1": torch.zeros(2, 2),
               "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 8)},
              adapters / "lycoris.safetensors")
    d["adapters"] = adapters
    runs = root / "runs"  # output_dirs holding one checkpoint each (a manifest as a real save writes it)
    for name, objective, overrides in (("dpo_ckpt", "dpo", ()), ("rank8_ckpt", "sft", ("--lora_rank", "8")),
                                       ("edit_ckpt", "sft", ("--tiny_variant", "edit-2509")),
                                       ("sft_ckpt", "sft", ()), ("full_ckpt", "sft", ("--finetune", "full"))):
        ckpt = runs / name / "checkpoint-2"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
        (ckpt / "optimizer.pt").write_bytes(b"optimizer state")
        _manifest(ckpt, objective, *overrides)
    (runs / "sft_ckpt_no_optimizer").mkdir()
    ckpt = runs / "sft_ckpt_no_optimizer" / "checkpoint-2"
    import shutil

    shutil.copytree(runs / "sft_ckpt" / "checkpoint-2", ckpt)
    (ckpt / "optimizer.pt").unlink()
    d["runs"] = runs
    dt = root / "dt_out"
    dt.mkdir()
    (dt / "metadata.jsonl").write_text('{"file_name": "x.png"}\n')
    d["dt_out"] = dt
    (root / "accelerate_missing.yaml").unlink(missing_ok=True)
    # ---- KTO (issue 23): rating pulls and what is not one
    d["kto_pairs_pull"] = _pairs(root / "kto_pairs_pull", [good_pair])
    (d["kto_pairs_pull"] / "summary.json").write_text(json.dumps({"kind": "pairs", "votes_per_rater": {"a": 1}}))
    d["kto_middle"] = _imagefolder(root / "kto_middle", [{**r, "ratings": [3, 3, 4]} for r in GOOD_ROWS])
    d["kto_one_rating"] = _imagefolder(root / "kto_one_rating", [{**r, "ratings": r["ratings"][:1]} for r in GOOD_ROWS])
    d["kto_one_rater_pull"] = _imagefolder(root / "kto_one_rater_pull", [{**r, "ratings": r["ratings"][:1]}
                                                                         for r in GOOD_ROWS])
    (d["kto_one_rater_pull"] / "summary.json").write_text(json.dumps({"kind": "ratings",
                                                                      "votes_per_rater": {"ann1": 3}}))
    d["kto_only_good"] = _imagefolder(root / "kto_only_good", [{**r, "ratings": [5, 5, 5]} for r in GOOD_ROWS])
    return d


BAD_REWARDS = """
import math
def nan(prompts, images, **kw): return [math.nan] * len(prompts)
def none(prompts, images, **kw): return [None] * len(prompts)
def constant(prompts, images, **kw): return [0.5] * len(prompts)
def short(prompts, images, **kw): return [0.5]
def text(prompts, images, **kw): return ["good"] * len(prompts)
def scalar(prompts, images, **kw): return 0.5
def infinite(prompts, images, **kw): return [math.inf] * len(prompts)
"""


@functools.lru_cache(maxsize=1)
def _tiny_width() -> int:
    from qwen_image import QwenImage

    return QwenImage.tiny(seed=0).transformer.transformer_blocks[0].attn.to_q.in_features


def _lora(path: Path, rank: int, width: int | None) -> None:
    """A diffusers-layout LoRA on one attention projection of the tiny model (``width``: another model's)."""
    import torch
    from safetensors.torch import save_file

    if width is None:
        width = _tiny_width()
    prefix = "transformer.transformer_blocks.0.attn.to_q"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(rank, width), f"{prefix}.lora_B.weight": torch.zeros(width, rank)},
              path)


def _manifest(folder: Path, objective: str, *overrides: str) -> None:
    """The manifest a real save writes last (align.checkpoints), for the run a tiny recipe of ``objective`` makes."""
    from align.checkpoints import run_identity, write_manifest
    from align.launch import parse_config
    from align.objectives import get_objective

    recipe = {"sft": SFT, "dpo": DPO, "grpo": GRPO}[objective]
    config = parse_config(get_objective(objective).resolved("config_class"), ["--config", recipe, *overrides])
    write_manifest(folder, run_identity(config))


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.parts}


# ---------------------------------------------------------------------------------------------------- runners
def _run_trainer(which: str, argv: list[str]) -> int:
    from align.launch import run_main

    if which == "sft":
        from align.sft import main
    elif which == "dpo":
        from align.dpo import main
    elif which == "kto":
        from align.kto import main
    else:
        from align.grpo import main
    return run_main(main, argv)


def _run_cli(which: str, argv: list[str]) -> int:
    try:
        if which in ("sft", "dpo", "grpo", "kto"):
            return _run_trainer(which, argv)
        if which == "align":
            from align.cli import main
        elif which == "datatools":
            from align.datatools.__main__ import main
        elif which == "annotation":
            from annotation.cli import main
        else:
            from align.demo import main
        return main(argv)
    except SystemExit as err:  # argparse's own exit (the demo keeps argparse's usage + error lines)
        return int(err.code or 0)


def _run_on(recipe: str, data: str, out: str = "{out}") -> list[str]:
    """The argv of a case that reads data: ``--config recipe --dataset_name data --output_dir out``."""
    return ["--config", recipe, "--dataset_name", data, "--output_dir", out]


# (id, cli, argv with {name} placeholders for fixture paths and {out} for a fresh folder, text the line must hold)
CASES = [
    # ---- SFT: options and recipes
    ("sft-bad-float", "sft", ["--config", SFT, "--learning_rate", "fast"], "invalid float value: 'fast'"),
    ("sft-abbreviation", "sft", ["--config", SFT, "--learning_rat", "1e-4"], "did you mean 'learning_rate'"),
    ("sft-bad-int", "sft", ["--config", SFT, "--per_device_train_batch_size", "two"], "invalid int value: 'two'"),
    ("sft-bad-choice", "sft", ["--config", SFT, "--lr_scheduler_type", "bogus"], "invalid choice: 'bogus'"),
    ("sft-stray-word", "sft", ["--config", SFT, "foo"], "unknown option 'foo'"),
    ("sft-config-missing", "sft", ["--config", "{root}/nope.yaml"], "nope.yaml: no such file"),
    ("sft-config-no-value", "sft", ["--config"], "--config needs a recipe path"),
    ("sft-yaml-syntax", "sft", ["--config", "{recipes}/syntax.yaml"], "not valid YAML at line"),
    ("sft-yaml-typo", "sft", ["--config", "{recipes}/typo.yaml"], "unknown option 'learnin_rate' (did you mean 'learning_rate'?)"),
    ("sft-yaml-list", "sft", ["--config", "{recipes}/list.yaml"], "must be a YAML mapping"),
    ("sft-max-steps-0", "sft", ["--config", SFT, "--max_steps", "0", "--dataset_name", "{sft}", "--output_dir", "{out}"],
     "max_steps 0 trains nothing"),
    ("sft-resolution", "sft", ["--config", SFT, "--resolution", "30"], "resolution must be a positive multiple of 16"),
    ("sft-finetune", "sft", ["--config", SFT, "--finetune", "qlora"], "finetune must be 'lora' or 'full'"),
    ("sft-caption-dropout", "sft", ["--config", SFT, "--caption_dropout", "1.5"], "caption_dropout must be in [0, 1)"),
    ("sft-aggregate", "sft", ["--config", SFT, "--rating_aggregate", "mode"], "rating_aggregate must be one of"),
    ("sft-lora-rank", "sft", ["--config", SFT, "--lora_rank", "0"], "lora_rank must be >= 1"),
    ("sft-no-dataset", "sft", ["--output_dir", "{out}"], "dataset_name is required"),
    ("sft-phases", "sft", ["--config", SFT, "--phases", '[{"until": 0.5}]'], "the last phase must end at until: 1.0"),
    # ---- SFT: output_dir and resume
    ("sft-previous-run", "sft", _run_on(SFT, "{sft}", "{previous_run}"),
     "already holds a run (checkpoint-3, pytorch_lora_weights.safetensors): pass --resume_from_checkpoint last"),
    ("sft-resume-finished-run", "sft", [*_run_on(SFT, "{sft}", "{finished_run}"), "--resume_from_checkpoint", "last"],
     "holds a run (pytorch_lora_weights.safetensors) but no complete checkpoint to resume"),
    ("sft-finished-run-no-circle", "sft", _run_on(SFT, "{sft}", "{finished_run}"),
     "already holds a run (pytorch_lora_weights.safetensors): "
                                                              "--overwrite_output_dir to replace it"),
    ("sft-resume-only-incomplete", "sft", [*_run_on(SFT, "{sft}", "{half_written}"), "--resume_from_checkpoint",
                                           "last"],
     "but no complete checkpoint to resume"),
    ("sft-resume-incomplete-path", "sft", [*_run_on(SFT, "{sft}"), "--resume_from_checkpoint",
                                           "{half_written}/checkpoint-5"],
     "not a complete checkpoint"),
    ("sft-resume-missing-path", "sft", [*_run_on(SFT, "{sft}"), "--resume_from_checkpoint", "{root}/nope"],
     "no such checkpoint folder"),
    ("sft-resume-other-run", "sft", [*_run_on(SFT, "{sft}", "{far_run}"), "--resume_from_checkpoint", "last",
                                     "--max_steps", "10"],
     "is at step 20, past max_steps 10"),
    # ---- SFT: data
    ("sft-dataset-missing", "sft", _run_on(SFT, "{root}/no_such_data"),
     "no_such_data' not found"),
    ("sft-dataset-relative-missing", "sft", ["--config", SFT, "--dataset_name", "data/tiny_sft_missing",
                                             "--output_dir", "{out}"], "not found: no such local folder or file"),
    ("sft-all-filtered", "sft", [*_run_on(SFT, "{sft}"), "--min_score", "5", "--min_raters", "4"],
     "no training rows left (3 rows, 3 too_few_ratings"),
    ("sft-rating-five", "sft", _run_on(SFT, "{sft_five}"),
     "row 0 (file_name='a.png'): rating 'five' is not a number"),
    ("sft-rating-scale", "sft", _run_on(SFT, "{sft_scale}"),
     "rating 7 is outside the rating scale [1, 5]"),
    ("sft-min-score-scale", "sft", [*_run_on(SFT, "{sft}"), "--min_score", "9"],
     "min_score 9 is outside the rating scale"),
    ("sft-no-ratings", "sft", _run_on(SFT, "{sft_unrated}"),
     "no 'ratings' column"),
    ("sft-bad-json", "sft", _run_on(SFT, "{sft_badjson}"),
     "metadata.jsonl:2: not valid JSON"),
    ("sft-missing-image", "sft", [*_run_on(SFT, "{sft_missing_img}"), "--min_raters", "0"],
     "row 2 (file_name='gone.png'): image: image not found"),
    ("sft-corrupt-image", "sft", [*_run_on(SFT, "{sft_corrupt}"), "--min_raters", "0"],
     "row 2 (file_name='bad.png'): image: unreadable image"),
    ("sft-empty-prompt", "sft", _run_on(SFT, "{sft_empty_prompt}"),
     "row 0 (file_name='a.png'): empty prompt"),
    ("sft-image-key", "sft", _run_on(SFT, "{sft_image_key}"),
     "rows must not have an 'image' key"),
    ("sft-no-rows", "sft", _run_on(SFT, "{sft_no_rows}"), "has no rows"),
    ("sft-empty-folder", "sft", _run_on(SFT, "{empty_dir}"),
     "not a dataset this tool can read"),
    # ---- DPO
    ("dpo-loss-type", "dpo", ["--config", DPO, "--loss_type", "kto"], "loss_type must be one of"),
    ("dpo-beta", "dpo", ["--config", DPO, "--beta", "0"], "beta must be > 0"),
    ("dpo-caption-dropout", "dpo", ["--config", DPO, "--caption_dropout", "0.1"], "unknown option '--caption_dropout' (an option of sft"),
    ("dpo-eval-fraction", "dpo", ["--config", DPO, "--eval_fraction", "1"], "eval_fraction must be in [0, 1)"),
    ("dpo-negative-weight", "dpo", ["--config", DPO, "--w_sft", "-1"], "w_sft must be >= 0"),
    ("dpo-yaml-typo", "dpo", ["--config", "{recipes}/typo_dpo.yaml"], "unknown option 'bta' (did you mean 'beta'?)"),
    ("dpo-max-steps-0", "dpo", [*_run_on(DPO, "{pairs}"), "--max_steps", "0"],
     "max_steps 0 trains nothing"),
    ("dpo-previous-run", "dpo", _run_on(DPO, "{pairs}", "{previous_run}"),
     "already holds a run"),
    ("dpo-resume-finished-run", "dpo", [*_run_on(DPO, "{pairs}", "{finished_run}"), "--resume_from_checkpoint", "last"],
     "but no complete checkpoint to resume"),
    ("dpo-min-agreement-range", "dpo", [*_run_on(DPO, "{pairs}"), "--min_agreement", "1.5"],
     "min_agreement must be in [0, 1]"),
    ("dpo-missing-rejected", "dpo", _run_on(DPO, "{pairs_no_rejected}"),
     "no row has a 'rejected' image"),
    ("dpo-dataset-missing", "dpo", _run_on(DPO, "{root}/no_pairs"),
     "preference dataset"),
    ("dpo-identical", "dpo", _run_on(DPO, "{pairs_same}"),
     "no usable preference pairs"),
    ("dpo-nan-agreement", "dpo", [*_run_on(DPO, "{pairs_nan}"), "--min_agreement", "0.5"], "1 agreement not in [0, 1]"),
    ("dpo-bad-json", "dpo", _run_on(DPO, "{pairs_badjson}"),
     "metadata.jsonl:2: not valid JSON"),
    ("dpo-no-agreement", "dpo", [*_run_on(DPO, "{pairs_novotes}"), "--min_agreement", "0.5"],
     "neither an 'agreement' nor a 'votes' column"),
    ("dpo-grpo-two-prompt-sources", "dpo", [*_run_on(DPO_GRPO, "{pairs}"), "--grpo_dataset_name", "{prompts}/ok.jsonl"],
     "both a prompt dataset"),
    # ---- GRPO
    ("grpo-unknown-reward", "grpo", ["--config", GRPO, "--reward_funcs", "nope", "--output_dir", "{out}"],
     "unknown reward 'nope'"),
    ("grpo-num-generations", "grpo", ["--config", GRPO, "--num_generations", "1"], "num_generations must be >= 2"),
    ("grpo-kl-form", "grpo", ["--config", GRPO, "--kl_form", "k3"], "kl_form must be one of"),
    ("grpo-beta", "grpo", ["--config", GRPO, "--beta", "-1"], "beta must be >= 0"),
    ("grpo-reward-kwargs", "grpo", ["--config", GRPO, "--reward_kwargs", "{bad"], "reward_kwargs is not valid JSON"),
    ("grpo-timestep-fraction", "grpo", ["--config", GRPO, "--timestep_fraction", "0"], "timestep_fraction must be in (0, 1]"),
    ("grpo-max-steps-0", "grpo", ["--config", GRPO, "--max_steps", "0", "--output_dir", "{out}"], "max_steps 0"),
    ("grpo-previous-run", "grpo", ["--config", GRPO, "--output_dir", "{previous_run}"], "already holds a run"),
    ("grpo-prompt-file-missing", "grpo", ["--config", GRPO, "--train_prompts", "{root}/ocr_prompts.jsonl",
                                          "--output_dir", "{out}"], "looks like a prompt file, but it does not exist"),
    ("grpo-two-prompt-sources", "grpo", ["--config", GRPO, "--dataset_name", "{prompts}/ok.jsonl",
                                         "--output_dir", "{out}"], "both a prompt dataset"),
    ("grpo-empty-prompt-file", "grpo", ["--config", GRPO, "--train_prompts", "{prompts}/empty.txt",
                                        "--output_dir", "{out}"], "empty.txt is empty"),
    ("grpo-blank-prompt-file", "grpo", ["--config", GRPO, "--train_prompts", "{prompts}/blank.txt",
                                        "--output_dir", "{out}"], "blank.txt is empty"),
    ("grpo-no-prompt-column", "grpo", ["--config", GRPO, "--train_prompts", "{prompts}/noprompt.jsonl",
                                       "--output_dir", "{out}"], "has no 'prompt' column"),
    ("grpo-bad-jsonl", "grpo", ["--config", GRPO, "--train_prompts", "{prompts}/bad.jsonl", "--output_dir", "{out}"],
     "bad.jsonl:2: not valid JSON"),
    ("grpo-prompt-format", "grpo", ["--config", GRPO, "--train_prompts", "{prompts}/prompts.xml",
                                    "--output_dir", "{out}"], "cannot read prompts from 'prompts.xml'"),
    ("grpo-prompt-dataset-missing", "grpo", ["--config", GRPO, "--train_prompts", "a", "b", "--dataset_name",
                                             "{root}/nope", "--output_dir", "{out}"], "both a prompt dataset"),
    # ---- round 3: values checked before caching (transformers checks them only when it builds the optimizer)
    ("sft-negative-lr", "sft", ["--config", SFT, "--learning_rate=-1e-3"], "--learning_rate -0.001: must be >= 0"),
    ("sft-negative-weight-decay", "sft", ["--config", SFT, "--weight_decay", "-1"], "--weight_decay -1.0: must be >= 0"),
    ("sft-epochs-0", "sft", ["--config", SFT, "--num_train_epochs", "0"], "--num_train_epochs 0.0: must be > 0"),
    ("sft-grad-accum-0", "sft", ["--config", SFT, "--gradient_accumulation_steps", "0"],
     "--gradient_accumulation_steps 0: must be >= 1"),
    ("sft-batch-0", "sft", ["--config", SFT, "--per_device_train_batch_size", "0"],
     "--per_device_train_batch_size 0: must be >= 1"),
    ("sft-negative-grad-norm", "sft", ["--config", SFT, "--max_grad_norm", "-1"], "--max_grad_norm -1.0: must be >= 0"),
    ("sft-save-steps-0", "sft", ["--config", SFT, "--save_strategy", "steps", "--save_steps", "0"],
     "--save_steps 0"),
    ("sft-save-total-limit-0", "sft", ["--config", SFT, "--save_total_limit", "0"], "--save_total_limit 0: must be >= 1"),
    ("sft-max-steps-negative", "sft", ["--config", SFT, "--max_steps", "-5"], "--max_steps -5: must be > 0, or -1"),
    ("sft-workers-negative", "sft", ["--config", SFT, "--dataloader_num_workers", "-1"],
     "--dataloader_num_workers -1: must be >= 0"),
    ("dpo-negative-lr", "dpo", ["--config", DPO, "--learning_rate", "-1"], "--learning_rate -1.0: must be >= 0"),
    ("dpo-negative-warmup", "dpo", ["--config", DPO, "--warmup_steps", "-1"], "warmup_steps >= 0"),
    ("grpo-negative-lr", "grpo", ["--config", GRPO, "--learning_rate=-1e-3"], "--learning_rate -0.001: must be >= 0"),
    ("grpo-no-signal-limit", "grpo", ["--config", GRPO, "--reward_no_signal_limit", "-1"],
     "--reward_no_signal_limit -1: must be >= 0"),
    ("grpo-batch-0", "grpo", ["--config", GRPO, "--per_device_train_batch_size", "0"], "must be >= 1"),
    # ---- round 3: resume refuses incomplete and foreign checkpoints before the weights load
    ("sft-resume-dpo-checkpoint", "sft", [*_run_on(SFT, "{sft}", "{runs}/dpo_ckpt"), "--resume_from_checkpoint",
                                          "last"],
     "it is a dpo checkpoint and this is a sft run"),
    ("sft-resume-dpo-checkpoint-path", "sft", [*_run_on(SFT, "{sft}"), "--resume_from_checkpoint",
                                               "{runs}/dpo_ckpt/checkpoint-2"],
     "it is a dpo checkpoint and this is a sft run"),
    ("dpo-resume-sft-checkpoint", "dpo", [*_run_on(DPO, "{pairs}", "{runs}/sft_ckpt"), "--resume_from_checkpoint",
                                          "last"],
     "it is a sft checkpoint and this is a dpo run"),
    ("grpo-resume-sft-checkpoint", "grpo", ["--config", GRPO, "--output_dir", "{runs}/sft_ckpt",
                                            "--resume_from_checkpoint", "last"], "it is a sft checkpoint and this is a grpo run"),
    ("sft-resume-other-rank", "sft", [*_run_on(SFT, "{sft}", "{runs}/rank8_ckpt"), "--resume_from_checkpoint", "last"],
     "trained with lora_rank 8, this run has --lora_rank 4: resume with --lora_rank 8"),
    ("sft-resume-edit-checkpoint", "sft", [*_run_on(SFT, "{sft}", "{runs}/edit_ckpt"), "--resume_from_checkpoint",
                                           "last"],
     "trained on an edit model, this run's model is a text-to-image model"),
    ("sft-resume-full-checkpoint", "sft", [*_run_on(SFT, "{sft}", "{runs}/full_ckpt"), "--resume_from_checkpoint",
                                           "last"],
     "its finetune is 'full', this run's is 'lora'"),
    ("sft-resume-missing-optimizer", "sft", [*_run_on(SFT, "{sft}"), "--resume_from_checkpoint",
                                             "{runs}/sft_ckpt_no_optimizer/checkpoint-2"],
     "is not a complete checkpoint (optimizer.pt is missing)"),
    ("sft-last-skips-missing-optimizer", "sft", [*_run_on(SFT, "{sft}", "{runs}/sft_ckpt_no_optimizer"),
                                                 "--resume_from_checkpoint", "last"],
     "but no complete checkpoint to resume"),
    # ---- round 3: LoRA files (--init_adapter): one line naming the file and the option
    *[(f"sft-init-adapter-{name}", "sft", [*_run_on(SFT, "{sft}"), "--init_adapter", f"{{adapters}}/{file}"], expected)
      for name, file, expected in (
          ("missing", "nope.safetensors", "does not exist"),
          ("truncated", "truncated.safetensors", "truncated.safetensors: not a readable .safetensors file"),
          ("rank", "r8.safetensors", "r8.safetensors has rank 8 (alpha 8), --lora_rank is 4"),
          ("bin", "lora.bin", "only .safetensors LoRA files are read"),
          ("two-files", "two", "exactly one .safetensors file"),
          ("no-lora", "no_lora.safetensors", "holds no LoRA weights"),
          ("other-size", "other_size.safetensors",
           "a LoRA for another model size (transformer_blocks.0.attn.to_q has input width"),
          ("lycoris", "lycoris.safetensors", "LyCORIS"))],
    ("dpo-init-adapter-rank", "dpo", [*_run_on(DPO, "{pairs}"), "--init_adapter", "{adapters}/r8.safetensors"],
     "has rank 8 (alpha 8)"),
    ("grpo-init-adapter-truncated", "grpo", ["--config", GRPO, "--finetune", "lora", "--lora_rank", "4",
                                             "--output_dir", "{out}", "--init_adapter",
                                             "{adapters}/truncated.safetensors"], "not a readable .safetensors file"),
    # ---- round 3: model / data mismatches
    ("sft-t2i-on-edit-data", "sft", _run_on(SFT, "{sft_edit}"),
     "edit data (column 'control_image') for a text-to-image model"),
    ("dpo-t2i-on-edit-pairs", "dpo", _run_on(DPO, "{pairs_edit}"),
     "edit data (column 'control_image') for a text-to-image model"),
    ("grpo-t2i-on-edit-prompts", "grpo", ["--config", GRPO, "--train_prompts", "{prompts}/edit.jsonl",
                                          "--output_dir", "{out}"],
     "edit data (column 'control_image') for a text-to-image model"),
    ("sft-edit-recipe-on-t2i-model", "sft", ["--config", EDIT_SFT, "--tiny_variant", "t2i", "--dataset_name",
                                             "{sft_edit}", "--output_dir", "{out}"],
     "edit data (column 'control_image') for a text-to-image model"),
    ("dpo-edit-recipe-on-t2i-model", "dpo", ["--config", str(TINY / "edit_dpo_lora.yaml"), "--tiny_variant", "t2i",
                                             "--dataset_name", "{pairs_edit}", "--output_dir", "{out}"],
     "edit data (column 'control_image') for a text-to-image model"),
    ("sft-edit-fourth-control", "sft", _run_on(EDIT_SFT, "{edit_four}"),
     "column 'control_image_3'"),
    ("sft-edit-missing-control", "sft", _run_on(EDIT_SFT, "{edit_missing}"),
     "row 1 (file_name='b.png'): control image 1: image not found"),
    ("sft-edit-elongated-control", "sft", ["--config", EDIT_SFT, "--dataset_name", "{edit_elongated}",
                                           "--output_dir", "{out}"], "row 1 (file_name='b.png'): a 3000x8 reference is too elongated"),
    ("sft-long-prompt", "sft", _run_on(SFT, "{sft_long}"),
     "row 1 (file_name='b.png'): prompt is 6006 tokens; Qwen-Image reads at most 1024"),
    ("sft-prompt-not-text", "sft", [*_run_on(SFT, "{sft_int_prompt}"), "--min_raters", "0"],
     "row 1 (file_name='b.png'): 'prompt' is 5 (a number) where row 0 "
                                                          "has text"),
    ("grpo-prompt-not-text", "grpo", ["--config", GRPO, "--train_prompts", "{prompts}/mixed.jsonl", "--output_dir",
                                      "{out}"], "row 1: 'prompt' is ['a', 'dog'] (a list) where row 0 has text"),
    ("dpo-long-prompt", "dpo", [*_run_on(DPO, "{pairs_long}"), "--eval_fraction", "0", "--eval_strategy", "no"],
     "prompt is 6006 tokens"),
    # ---- round 3: online rewards (the run stops with one line naming the reward)
    *[(f"grpo-reward-{name}", "grpo", ["--config", GRPO, *FAST_GRPO, "--reward_funcs", f"bad_rewards.{name}",
                                       "--output_dir", "{out}"], expected)
      for name, expected in (
          ("nan", "reward 'bad_rewards.nan' scored every image None / NaN for 3 rollout batches in a row"),
          ("none", "reward 'bad_rewards.none' scored every image None / NaN"),
          ("constant", "reward 'bad_rewards.constant' gave every image the same score (0.5)"),
          ("short", "reward 'bad_rewards.short' returned 1 values for 2 images"),
          ("text", "reward 'bad_rewards.text' returned 'good' (str) for image 0"),
          ("scalar", "reward 'bad_rewards.scalar' returned a float, not a list of 2 scores"),
          ("infinite", "reward 'bad_rewards.infinite' returned inf for image 0"))],
    ("grpo-reward-module-raises", "grpo", ["--config", GRPO, "--reward_funcs", "raising_rewards.fn", "--output_dir",
                                           "{out}"], "importing 'raising_rewards' raised RuntimeError: broken on purpose"),
    ("grpo-reward-attr-missing", "grpo", ["--config", GRPO, "--reward_funcs", "bad_rewards.nope", "--output_dir",
                                          "{out}"], "reward 'bad_rewards.nope': 'bad_rewards' has no callable 'nope'"),
    ("grpo-reward-one-of-two-short", "grpo", ["--config", GRPO, *FAST_GRPO, "--reward_funcs", "brightness",
                                              "bad_rewards.short", "--output_dir", "{out}"],
     "reward 'bad_rewards.short' returned 1 values"),
    ("dpo-grpo-reward-nan", "dpo", [*_run_on(DPO_GRPO, "{pairs}"), "--reward_funcs", "bad_rewards.nan",
                                    "--num_generations", "2", "--train_prompts", "a cat", "a dog", "--num_inference_steps", "2",
                                    "--per_device_train_batch_size", "2",
                                    "--eval_fraction", "0", "--eval_strategy", "no"],
     "reward 'bad_rewards.nan' scored every image None / NaN"),
    # ---- KTO (issue 23): what is not a rating project, ratings the labels cannot use, thresholds that cannot label
    ("kto-pairs-pull", "kto", ["--config", KTO, "--dataset_name", "{kto_pairs_pull}", "--output_dir", "{out}"],
     "is the pull of a 'pairs' project, not a rating project: KTO learns from per-image ratings"),
    ("kto-pairs-data", "kto", ["--config", KTO, "--dataset_name", "{pairs}", "--output_dir", "{out}"],
     "the dataset holds preference pairs (chosen / rejected), not rated images"),
    ("kto-no-dataset", "kto", ["--output_dir", "{out}"], "dataset_name is required: a rating project's pull"),
    ("kto-dataset-missing", "kto", ["--config", KTO, "--dataset_name", "{root}/no_ratings", "--output_dir", "{out}"],
     "no_ratings' not found"),
    ("kto-no-ratings-column", "kto", ["--config", KTO, "--dataset_name", "{sft_unrated}", "--output_dir", "{out}"],
     "the dataset has no 'ratings' column"),
    ("kto-rating-outside-scale", "kto", ["--config", KTO, "--dataset_name", "{sft_scale}", "--output_dir", "{out}"],
     "row 0 (file_name='a.png'): rating 7 is outside the rating scale [1, 5]"),
    ("kto-rating-not-a-number", "kto", ["--config", KTO, "--dataset_name", "{sft_five}", "--output_dir", "{out}"],
     "row 0 (file_name='a.png'): rating 'five' is not a number"),
    ("kto-all-middle-band", "kto", ["--config", KTO, "--dataset_name", "{kto_middle}", "--output_dir", "{out}"],
     "all 3 rated images fall between the thresholds (mean between 2 and 4.5)"),
    ("kto-pull-one-rater", "kto", ["--config", KTO, "--dataset_name", "{kto_one_rater_pull}", "--output_dir",
                                   "{out}"], "the rating project was rated by 1 rater(s) but min_raters is 3"),
    ("kto-rows-one-rating", "kto", ["--config", KTO, "--dataset_name", "{kto_one_rating}", "--output_dir", "{out}"],
     "no image has 3 ratings (at most 1 per image)"),
    ("kto-only-desirable", "kto", ["--config", KTO, "--dataset_name", "{kto_only_good}", "--output_dir", "{out}"],
     "only desirable images (3; none dropped): KTO needs undesirable ones too"),
    ("kto-thresholds-inverted", "kto", ["--config", KTO, "--desirable_threshold", "2", "--undesirable_threshold", "4"],
     "undesirable_threshold (4) must be below desirable_threshold (2)"),
    ("kto-thresholds-equal", "kto", ["--config", KTO, "--desirable_threshold", "3", "--undesirable_threshold", "3"],
     "undesirable_threshold (3) must be below desirable_threshold (3)"),
    ("kto-threshold-outside-scale", "kto", ["--config", KTO, "--desirable_threshold", "6"],
     "desirable_threshold 6 is outside the rating scale [1, 5]"),
    ("kto-scale-inverted", "kto", ["--config", KTO, "--rating_scale", "5", "1"],
     "rating_scale must be two numbers [low, high] with low < high"),
    ("kto-min-raters-0", "kto", ["--config", KTO, "--min_raters", "0"], "min_raters must be >= 1 for KTO"),
    ("kto-weights-both-0", "kto", ["--config", KTO, "--desirable_weight", "0", "--undesirable_weight", "0"],
     "must be >= 0 and not both 0"),
    ("kto-kl-estimate", "kto", ["--config", KTO, "--kl_estimate", "paper"], "kl_estimate must be one of"),
    ("kto-mismatched-batch-1", "kto", ["--config", KTO, "--kl_estimate", "mismatched", "--per_device_train_batch_size",
                                       "1"], "per_device_train_batch_size must be >= 2"),
    ("kto-previous-run", "kto", ["--config", KTO, "--dataset_name", "{sft}", "--output_dir", "{previous_run}"],
     "already holds a run"),
    ("align-kto-thresholds-inverted", "align", ["kto", "--config", KTO, "--desirable_threshold", "2",
                                                "--undesirable_threshold", "4"], "must be below desirable_threshold"),
    # ---- qwen-image-align (checked before accelerate starts anything)
    ("align-unknown-command", "align", ["train", "--config", SFT], "unknown command 'train'"),
    ("align-config-missing", "align", ["sft", "--config", "{root}/nope.yaml"], "no such file"),
    ("align-typo", "align", ["sft", "--config", SFT, "--learning_rat", "1"], "did you mean '--learning_rate'"),
    ("align-accelerate-typo", "align", ["dpo", "--config", DPO, "--num_procs", "2"], "did you mean '--num_processes'"),
    ("align-accelerate-bad-value", "align", ["sft", "--config", SFT, "--num_processes", "two"],
     "invalid int value: 'two'"),
    ("align-accelerate-config-missing", "align", ["grpo", "--config", GRPO, "--config_file", "{root}/nope.yaml"],
     "no such accelerate config file"),
    ("align-multi-gpu-one-process", "align", ["sft", "--config", SFT, "--multi_gpu", "--num_processes", "1"],
     "--multi_gpu needs --num_processes 2 or more"),
    ("align-accelerate-config-no-value", "align", ["grpo", "--config", GRPO, "--accelerate_config"],
     "--accelerate_config needs a file"),
    ("align-bad-value", "align", ["dpo", "--config", DPO, "--loss_type", "kto"], "loss_type must be one of"),
    ("align-yaml-syntax", "align", ["sft", "--config", "{recipes}/syntax.yaml"], "not valid YAML"),
    ("align-negative-lr", "align", ["sft", "--config", SFT, "--learning_rate=-1e-3"], "--learning_rate -0.001"),
    ("align-dpo-weight-decay", "align", ["dpo", "--config", DPO, "--weight_decay", "-1"], "--weight_decay -1.0"),
    ("align-grpo-grad-norm", "align", ["grpo", "--config", GRPO, "--max_grad_norm", "-2"], "--max_grad_norm -2.0"),
    ("align-no-command-value", "align", ["sft", "--config", SFT, "--num_processes"], "--num_processes"),
    # ---- python -m align.datatools
    ("dt-missing-folder", "datatools", ["filter", "--data-dir", "{root}/nope", "--out", "{out}"], "no such folder"),
    ("dt-out-is-input", "datatools", ["filter", "--data-dir", "{sft}", "--out", "{sft}"], "--out must differ from --data-dir"),
    ("dt-out-exists", "datatools", ["filter", "--data-dir", "{sft}", "--out", "{dt_out}"],
     "already exists and is not empty: pass --overwrite"),
    ("dt-synth-out-exists", "datatools", ["synth", "--texts", "OPEN", "--out", "{dt_out}"], "pass --overwrite"),
    ("dt-empty-folder", "datatools", ["filter", "--data-dir", "{empty_dir}", "--out", "{out}"], "not a readable imagefolder"),
    ("dt-empty-text", "datatools", ["synth", "--texts", "", "--out", "{out}"], "no texts to render"),
    ("dt-texts-file-missing", "datatools", ["synth", "--texts-file", "{root}/nope.txt", "--out", "{out}"], "no such file"),
    ("dt-size", "datatools", ["synth", "--texts", "OPEN", "--size", "0", "--out", "{out}"], "--size must be"),
    ("dt-corpus-missing", "datatools", ["rare", "--corpus", "{root}/nope.txt"], "--corpus"),
    ("dt-unknown-option", "datatools", ["filter", "--data-dir", "{sft}", "--out", "{out}", "--min-sid", "3"],
     "unrecognized arguments: --min-sid"),
    ("dt-abbreviation", "datatools", ["filter", "--data-dir", "{sft}", "--out", "{out}", "--min-si", "3"],
     "unrecognized arguments: --min-si"),
    ("dt-no-command", "datatools", [], "the following arguments are required"),
    ("dt-synth-bad-mode", "datatools", ["synth", "--texts", "OPEN", "--modes", "bogus", "--out", "{out}"],
     "invalid choice: 'bogus'"),
    ("dt-synth-three-sizes", "datatools", ["synth", "--texts", "OPEN", "--size", "16", "32", "64", "--out", "{out}"],
     "--size must be W or W H"),
    ("dt-synth-empty-texts-file", "datatools", ["synth", "--texts-file", "{prompts}/empty.txt", "--out", "{out}"],
     "no texts to render"),
    ("dt-rare-lengths", "datatools", ["rare", "--corpus", "{prompts}/ok.jsonl", "--min-len", "5", "--max-len", "2"],
     "need 1 <= min-len <= max-len"),
    ("dt-filter-aspect", "datatools", ["filter", "--data-dir", "{sft}", "--out", "{out}", "--max-aspect", "0"],
     "--max-aspect 0.0: the long side over the short one, so >= 1"),
    ("dt-filter-dup-distance", "datatools", ["filter", "--data-dir", "{sft}", "--out", "{out}", "--dup-distance", "-1"],
     "--dup-distance -1: a Hamming distance"),
    ("dt-filter-data-is-file", "datatools", ["filter", "--data-dir", "{sft}/metadata.jsonl", "--out", "{out}"],
     "no such folder"),
    # ---- qwen-image-annotation (no server needed)
    ("ann-no-token", "annotation", ["status", "--project-id", "1"], "no API token"),
    ("ann-token-file-missing", "annotation", ["status", "--project-id", "1", "--token-file", "{root}/nope"],
     "does not exist"),
    ("ann-bad-url", "annotation", ["status", "--project-id", "1", "--url", "localhost8080", "--token-file", "{sft}/metadata.jsonl"],
     "is not an http(s) URL"),
    ("ann-bad-port", "annotation", ["status", "--project-id", "1", "--url", "http://127.0.0.1:99999",
                                    "--token-file", "{sft}/metadata.jsonl"], "is not a valid URL"),
    ("ann-missing-arg", "annotation", ["status"], "the following arguments are required: --project-id"),
    ("ann-unknown-command", "annotation", ["pul"], "invalid choice: 'pul'"),
    ("ann-prompts-missing", "annotation", ["generate-pairs", "--prompts", "{root}/nope.txt", "--out", "{out}"],
     "does not exist"),
    ("ann-bad-int", "annotation", ["status", "--project-id", "x"], "invalid int value: 'x'"),
    ("ann-edit-source-missing", "annotation", ["generate-pairs", "--edits", "{edits}/missing.jsonl", "--out", "{out}"],
     "missing.jsonl:1: source image 1"),
    ("ann-edit-four-sources", "annotation", ["generate-pairs", "--edits", "{edits}/four.jsonl", "--out", "{out}"],
     "four.jsonl:1: 4 source images; Edit-2509/2511 take 1 to 3"),
    ("ann-out-is-file", "annotation", ["generate-pairs", "--prompts", "{prompts}/ok.jsonl", "--out",
                                       "{sft}/metadata.jsonl"], "is a file, not a folder"),
    ("ann-empty-prompts", "annotation", ["generate-pairs", "--prompts", "{prompts}/empty.txt", "--out", "{out}"],
     "no prompts in"),
    ("ann-pull-out-under-file", "annotation", ["pull", "--project-id", "1", "--token-file", "{sft}/metadata.jsonl",
                                               "--out", "{sft}/metadata.jsonl/pairs"], "is a file, not a folder"),
    ("ann-prompts-and-edits", "annotation", ["generate-pairs", "--prompts", "{prompts}/ok.jsonl", "--edits",
                                             "{edits}/four.jsonl", "--out", "{out}"], "not allowed with argument"),
    # ---- qwen-image-demo
    ("demo-config-missing", "demo", ["--config", "{root}/nope.yaml", "--output_dir", "{out}"], "nope.yaml"),
    ("demo-unknown-option", "demo", ["--fastt"], "unrecognized arguments: --fastt"),
    ("demo-yaml-syntax", "demo", ["--config", "{recipes}/syntax.yaml", "--output_dir", "{out}"],
     "syntax.yaml: not valid YAML at line 3"),
    ("demo-output-is-file", "demo", ["--output_dir", "{sft}/metadata.jsonl"], "is a file, not a folder"),
    ("demo-output-under-file", "demo", ["--output_dir", "{sft}/metadata.jsonl/demo"], "is a file, not a folder"),
    ("demo-config-list", "demo", ["--config", "{recipes}/demo_list.yaml", "--output_dir", "{out}"],
     "expected a mapping at the top level"),
    ("demo-bad-seed", "demo", ["--seed", "x"], "invalid int value: 'x'"),
]


def _fill(arg: str, paths: dict[str, str]) -> str:
    for key, value in paths.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def _no_model_expected(config):
    raise AssertionError("the model was loaded before the mistake was found")


@pytest.mark.parametrize("case_id, cli, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case_id, cli, argv, expected, data, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # relative paths (outputs/, data/) resolve in an empty folder
    monkeypatch.syspath_prepend(str(data["root"]))  # the user's reward modules (bad_rewards.py, ...)
    paths = {k: str(v) for k, v in data.items()} | {"out": str(tmp_path / "out")}
    args = [_fill(a, paths) for a in argv]
    if cli == "kto":  # these are all found before the weights load: loading them would be the bug
        monkeypatch.setattr("align.modeling.load_qwen_image", _no_model_expected)
    before = _snapshot(data["root"])
    code = _run_cli(cli, args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert len(errors) == 1, err
    assert expected in errors[0], errors[0]
    assert _snapshot(data["root"]) == before, "a failing command changed the user's files"
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_the_table_is_large_and_covers_every_cli():
    assert len(CASES) >= 150 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} == {"sft", "dpo", "grpo", "kto", "align", "datatools", "annotation", "demo"}


@pytest.mark.parametrize("which", ["sft", "dpo", "grpo"])
def test_help_exits_0_and_lists_the_projects_options_first(which, capsys):
    assert _run_trainer(which, ["--help"]) == 0
    # (wandb's one-time "[INFO] Running in WANDB offline mode" may come first, in whichever test imports it)
    out = "\n".join(line for line in capsys.readouterr().out.splitlines() if not line.startswith("[INFO]"))
    assert out.startswith("usage:") and "--config RECIPE.yaml" in out and "--help-all" in out
    own = {"sft": "--min_raters", "dpo": "--loss_type", "grpo": "--num_generations"}[which]
    assert own in out and out.index(own) < out.index("--learning_rate")
    assert "'last'" in out[out.index("--resume_from_checkpoint"):]  # the short help explains `last`
    assert len(out.splitlines()) < 400  # not transformers' ~600-line help (the combined objective lists its online and KTO terms)
    assert _run_trainer(which, ["--help-all"]) == 0
    assert "--adam_beta1" in capsys.readouterr().out


@pytest.mark.parametrize("recipe, subject", [
    ("sft_lora.yaml", "memory estimate for the real qwen-image model (20.4 B; /models/Qwen-Image has no"),
    ("tiny/sft_lora.yaml", "not for this run's tiny random model"),
])
def test_estimate_only_needs_no_gpu_and_says_which_model_it_is_for(recipe, subject, capsys):
    """The newcomer planning which GPU to rent, on a laptop: no --use_cpu needed, and the figure names its model."""
    import torch

    assert not torch.cuda.is_available()  # what this test is about (the CI machine has no GPU)
    assert _run_trainer("sft", ["--config", str(ROOT / "recipes" / recipe), "--estimate_only"]) == 0
    out = capsys.readouterr().out
    assert subject in out and "estimated peak GPU memory" in out


def test_a_user_error_wrapped_by_a_library_is_still_one_line(capsys):
    """datasets.map workers, callbacks and other wrappers re-raise our UserError inside their own exception: the
    cause chain (``raise ... from``) and the context of an exception a library raised both surface as the one line."""
    import datasets

    from align.launch import run_main
    from qwen_image.errors import UserError

    def in_map(argv):
        def encode(row):
            raise UserError("row 3 (file_name='a.png'): prompt is 2000 tokens")
        try:
            datasets.Dataset.from_dict({"x": [1]}).map(encode)
        except UserError as err:
            raise RuntimeError("One of the subprocesses has abruptly died during map operation") from err

    def library_raises_while_handling(argv):
        try:
            raise UserError("--init_adapter x.safetensors: truncated")
        except UserError:
            json.loads("{")  # a library failing in the handler (e.g. while cleaning up)

    for fn, line in ((in_map, "row 3 (file_name='a.png'): prompt is 2000 tokens"),
                     (library_raises_while_handling, "--init_adapter x.safetensors: truncated")):
        assert run_main(fn, []) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and [x for x in err.splitlines() if "error" in x] == [f"error: {line}"], err


def test_ctrl_c_before_any_checkpoint_says_nothing_was_saved_and_how_to_start_again(tmp_path, capsys, monkeypatch):
    from align import launch

    config = launch.parse_config(__import__("align.configs.sft", fromlist=["SFTConfig"]).SFTConfig,
                                 ["--config", SFT, "--output_dir", str(tmp_path / "o")])
    monkeypatch.setattr(launch, "_ACTIVE", {"config": config, "objective": "sft",
                                            "argv": ["--config", SFT, "--overwrite_output_dir"]})
    monkeypatch.delenv(launch.COMMAND_ENV, raising=False)

    def interrupted(argv):
        raise KeyboardInterrupt

    assert launch.run_main(interrupted, []) == 130
    stderr = capsys.readouterr().err
    lines = [x for x in stderr.splitlines() if x.startswith("interrupted")]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    err = lines[0]
    assert err.startswith("interrupted (Ctrl-C): no checkpoint in") and err.endswith(
        f"start again with: qwen-image-align sft --config {SFT}"), err


def test_a_bug_keeps_its_traceback(capsys):
    from align.launch import run_main

    def buggy(argv):
        raise KeyError("internal")

    assert run_main(buggy, []) == 1
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- end to end
def test_scripts_end_to_end(data, tmp_path):
    """The real entry points: `python align/sft.py --help` (exit 0, no traceback; it used to be a SystemExit
    traceback), `python -m align.datatools` (exit code 2 through sys.exit)."""
    help_run = subprocess.run([sys.executable, str(ROOT / "align/sft.py"), "--help"], capture_output=True, text=True,
                              env=launch_env(), timeout=120, cwd=tmp_path)
    assert help_run.returncode == 0 and "Traceback" not in help_run.stderr and "--config" in help_run.stdout
    dt = subprocess.run([sys.executable, "-m", "align.datatools", "filter", "--data-dir", str(tmp_path / "nope"),
                         "--out", str(tmp_path / "o")], capture_output=True, text=True, env=launch_env(), timeout=120)
    assert dt.returncode == 2 and dt.stderr.strip() == f"error: --data-dir {tmp_path / 'nope'}: no such folder"


def test_qwen_image_align_passes_the_scripts_one_line_error_through_accelerate(data, tmp_path):
    """A data mistake found inside the launched training process: exit 2 and its one line, without accelerate's
    CalledProcessError traceback."""
    proc = subprocess.run([sys.executable, "-m", "align.cli", "sft", "--config", SFT, "--num_processes", "1",
                           "--dataset_name", str(data["sft_five"]), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, env=launch_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rating 'five' is not a number" in errors[0]
    # Nothing but that line: no library warnings, no accelerate "values were not passed" note, in either process.
    assert proc.stderr.strip().splitlines() == errors, proc.stderr[-2000:]


def test_raw_accelerate_launch_quiet_ends_with_the_scripts_one_line(data, tmp_path):
    """``accelerate launch`` itself raises CalledProcessError for any failed child (its launcher's rule, which a
    child cannot change); with ``--quiet`` (docs/distributed.md) the user sees only the script's line."""
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1",
                           str(ROOT / "align/sft.py"), "--config", SFT, "--dataset_name", str(data["sft_five"]),
                           "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, env=launch_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rating 'five' is not a number" in errors[0]


@pytest.mark.slow
def test_a_reward_failing_on_one_process_stops_every_process_with_one_line(tmp_path):
    """2 processes (CPU, gloo): the reward returns NaN on process 1 only. The verdict is shared every rollout batch,
    so both processes stop at the same scoring (none waits for the other in a collective), the run exits 2, and
    the line (which says which process) is printed once, by process 0, without torchrun's failure report."""
    (tmp_path / "rank_rewards.py").write_text(
        "import math, os\n"
        "def nan_on_rank_1(prompts, images, **kw):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        return [math.nan] * len(prompts)\n"
        "    return [0.1 * i for i in range(len(prompts))]  # spread: process 0 alone would train on\n",
        encoding="utf-8")
    env = {**launch_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "align.cli", "grpo", "--config", GRPO, "--multi_gpu",
                           "--num_processes", "2", "--train_prompts", "a cat", "a dog", "a cow", "a hen",
                           "--num_generations", "2", "--per_device_train_batch_size", "2",
                           "--gradient_accumulation_steps", "1", "--num_inference_steps", "2", "--max_steps", "3",
                           "--reward_funcs", "rank_rewards.nan_on_rank_1", "--output_dir", str(tmp_path / "o"),
                           "--disable_tqdm", "true"],
                          capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: reward 'rank_rewards.nan_on_rank_1' scored every image None / NaN for 3 "
                                "rollout batches in a row") and "on process 1 of 2, not the others" in errors[0]
    assert not (tmp_path / "o" / "pytorch_model.bin").exists()


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warn" in line.lower()]


@pytest.mark.slow
def test_help_and_a_one_line_error_print_no_library_warnings(tmp_path):
    """What a user sees first: no torchao / pytree / transformers deprecation chatter before the help or the line,
    through ``qwen-image-align`` (the launcher) and the training script it would launch."""
    env = launch_env()
    help_run = subprocess.run([sys.executable, "-m", "align.cli", "sft", "--help"], capture_output=True, text=True,
                              env=env, timeout=300, cwd=tmp_path)
    assert help_run.returncode == 0 and "--config RECIPE.yaml" in help_run.stdout, help_run.stderr[-2000:]
    assert _noise(help_run.stderr) == [] and "Failed to load" not in help_run.stderr, help_run.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "align.cli", "sft", "--config", SFT, "--learning_rate", "fast"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and _noise(bad.stderr) == [], bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines() == ["error: argument --learning_rate/--learning-rate: invalid float value: "
                                               "'fast'"], bad.stderr[-2000:]


def test_the_no_signal_verdict_is_shared_by_every_process(monkeypatch, capsys):
    """The verdict over every process's totals (what each process holds after the per-scoring exchange): a process
    whose reward gave nothing stops the run, zero spread counts over all processes, and a reward error on one
    process reaches the others. Every process raises; only process 0 prints."""
    from align.launch import run_main
    from align.rl import rewards
    from qwen_image.errors import UserError

    class Fixed:
        names = ["r"]

        def __init__(self, totals):
            self.totals = totals

        def compute(self, prompts, images, **columns):
            return type("Result", (), {"total": self.totals, "per_reward": {"r": self.totals}})()

    def run(per_process: list[list], limit: int = 2):
        watch = rewards.SignalWatch(Fixed(per_process[0]), limit)
        monkeypatch.setattr(rewards, "_gather", lambda payload: [payload, *[
            {"totals": t, "silent": ["r"] if all(v is None for v in t) else [], "error": None} for t in per_process[1:]]])
        for _ in range(limit):
            watch.compute(["a"] * len(per_process[0]), [None] * len(per_process[0]))

    with pytest.raises(UserError, match=r"scored every image None / NaN .*on process 1 of 2, not the others") as err:
        run([[0.1, 0.2], [None, None]])
    assert err.value.same_on_every_process
    run([[0.5], [0.7]])  # each process alone has one value, together they have spread: the run goes on
    with pytest.raises(UserError, match=r"gave every image the same score \(0.5\) .* over 2 processes"):
        run([[0.5], [0.5]])

    def short_on_process_1(payload):
        return [payload, {"totals": None, "silent": [], "error": "reward 'r' returned 1 values for 2 images"}]

    monkeypatch.setattr(rewards, "_gather", short_on_process_1)
    watch = rewards.SignalWatch(Fixed([0.1, 0.2]), 3)
    with pytest.raises(UserError, match=r"returned 1 values for 2 images \(on process 1 of 2, not the others\)") as err:
        watch.compute(["a", "b"], [None, None])

    def stop(argv):
        raise err.value

    for rank, printed in (("1", []), ("0", [f"error: {err.value}"])):
        monkeypatch.setenv("RANK", rank)
        assert run_main(stop, []) == 2
        assert capsys.readouterr().err.splitlines() == printed


def test_ctrl_c_before_the_first_checkpoint_of_a_replacing_run_says_to_replace_again(data, tmp_path, monkeypatch,
                                                                                      capsys):
    """The run was replacing an older one (--overwrite_output_dir; the old adapter is still there until the new save):
    the command to start again keeps --overwrite_output_dir, or it would be refused with "already holds a run"."""
    import shutil

    from align import launch
    from align.configs.sft import SFTConfig

    out = tmp_path / "o"
    shutil.copytree(data["finished_run"], out)
    argv = ["--config", SFT, "--output_dir", str(out), "--overwrite_output_dir"]
    config = launch.parse_config(SFTConfig, argv)
    monkeypatch.setattr(launch, "_ACTIVE", {"config": config, "objective": "sft", "argv": argv})
    monkeypatch.delenv(launch.COMMAND_ENV, raising=False)

    def interrupted(argv):
        raise KeyboardInterrupt

    assert launch.run_main(interrupted, []) == 130
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("interrupted")][0]
    assert "the first is saved at step 5" in line  # the tiny recipe saves every 5 steps
    assert line.endswith(f"start again with: qwen-image-align sft --config {SFT} --output_dir {out} "
                         f"--overwrite_output_dir"), line
