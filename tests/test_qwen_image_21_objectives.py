"""Every remaining objective on the tiny Qwen-Image-2.1 in bf16 on CPU, through the normal launch path: edit LoRA
SFT and Flow-DPO (``model_family: qwen-image-2.1-edit``: the cache holds what 2.1's edit forward reads, references
and ``img_mask``, equal to the bundle's own conditioning), full fine-tuning SFT, DiffusionNFT, AWM, DGPO, KTO and
DPO+NFT; before the first update NFT's implicit velocities equal the trained one and AWM's / DGPO's ratios are
exactly 1 in bf16; and a DiffusionNFT run killed with SIGKILL resumes (``--resume_from_checkpoint last``) to the
uninterrupted run's adapter bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import rated_images
from lora_helpers import lora_b_moved
from PIL import Image
from safetensors.torch import load_file
from test_forward_resume import check_kill_and_resume
from test_forward_rl import TINY, _bf16_trainer, check_nft_implicit_velocities, check_ratios_exactly_one
from test_qwen_image_21_training import Q21, run_dpo

from align.launch import train_main

ROOT = Path(__file__).resolve().parents[1]
Q21_EDIT = ["--model_family", "qwen-image-2.1-edit", "--model_dtype", "bfloat16"]
# Prompts of one token length: 2.1 batches of mixed lengths shift the image tokens' positions (docs/models.md).
PROMPTS = ["a red cat", "a red dog"]
ONLINE = ["--train_prompts", *PROMPTS, "--gradient_accumulation_steps", "1", "--disable_tqdm", "true"]


def _losses(trainer, key: str = "loss") -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def _edit_rows(folder: Path) -> Path:
    """Three edit rows: two with one control image, one with two (its own bucket); 32 px images, but the first
    row's target is 96x64 px (a 3:2 bucket)."""
    folder.mkdir()
    rows = []
    for i in range(3):
        for k, name in enumerate((f"t{i}", f"s{i}", f"u{i}")):
            arr = (np.random.default_rng(10 * i + k).random((4, 4, 3)) * 255).astype(np.uint8)
            size = (96, 64) if name == "t0" else (32, 32)
            Image.fromarray(arr).resize(size, Image.NEAREST).save(folder / f"{name}.png")
        row = {"file_name": f"t{i}.png", "prompt": f'replace the text with "OPEN{i}"', "control_image": f"s{i}.png"}
        if i == 2:
            row["control_image_1"] = f"u{i}.png"
        rows.append(row)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# --------------------------------------------------------------------------- sizes
def test_aspect_ratio_buckets_step_by_the_models_size_multiple():
    from align.data.buckets import BucketSizeFn, bucket_sizes
    from qwen_image.qwen_image_21 import SIZE_MULTIPLE

    sizes = bucket_sizes(1024, multiple=SIZE_MULTIPLE)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in sizes)
    assert any(h % 32 for h, w in bucket_sizes(1024))  # Qwen-Image's 16 px buckets include sides 2.1 refuses
    assert all(abs(h * w / 1024**2 - 1) < 0.1 for h, w in sizes)
    # The cache key names a 32 px step; a 16 px one keeps the key it always had.
    assert "multiple=32" in repr(BucketSizeFn(64, multiple=32)) and "multiple" not in repr(BucketSizeFn(64))


# --------------------------------------------------------------------------- edit training
def test_edit_lora_sft_bf16_caches_what_the_21_edit_forward_reads(tmp_path):
    from align.data.edit import IMG_MASK, REFERENCE_LATENTS, open_control
    from align.sft import main
    from qwen_image.qwen_image_21 import QwenImage21

    data = _edit_rows(tmp_path / "data")
    out = tmp_path / "out"
    run = main(["--config", str(ROOT / "recipes/tiny/q21_edit_sft_lora.yaml"), "--dataset_name", str(data),
                "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), "--max_steps", "2",
                "--per_device_train_batch_size", "1", "--learning_rate", "1e-2", "--logging_steps", "1",
                "--resolution", "64", "--aspect_ratio_buckets", "true"])
    assert isinstance(run.qwen, QwenImage21) and run.qwen.edit_model and run.data.edit
    assert run.qwen.transformer.dtype == torch.bfloat16
    assert len(_losses(run)) == 2 and all(np.isfinite(_losses(run)))
    assert lora_b_moved(load_file(out / "pytorch_lora_weights.safetensors")) > 0
    # Aspect-ratio buckets step by 32 px for 2.1 (16 px would put the 3:2 target at 48x80, which 2.1 cannot take).
    sizes = {(int(r["height"]), int(r["width"])) for r in run.train_dataset}
    assert sizes == {(64, 64), (64, 96)}

    # The cached row is the bundle's own edit conditioning of that row (the pipeline's, tested in
    # test_qwen_image_21.py): embeddings, the image slots the transformer needs, and the references' VAE tokens.
    fresh = QwenImage21.tiny(seed=0, dtype=torch.bfloat16, edit=True)
    meta = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for row in run.train_dataset:
        source = next(m for m in meta if m["prompt"] == row["prompt"])
        controls = [open_control({"path": str(data / source[c]), "bytes": None})
                    for c in ("control_image", "control_image_1") if c in source]
        cond = fresh.conditioning([source["prompt"]], [controls])
        assert torch.equal(torch.as_tensor(row["prompt_embeds"]).view_as(cond.embeds[0]), cond.embeds[0].float())
        assert torch.equal(torch.as_tensor(row[IMG_MASK]).bool(), cond.img_mask[0])
        assert int(cond.img_mask[0].sum()) * 4 == cond.references.latents.shape[1] == 16 * len(controls)
        assert torch.equal(torch.as_tensor(row[REFERENCE_LATENTS]), cond.references.latents[0].float())


def test_edit_dpo_lora_bf16_trains_on_batches_carrying_img_mask(tmp_path):
    from align.data.edit import write_synthetic_edit_pairs

    data = write_synthetic_edit_pairs(tmp_path / "pairs", n=4, size=32)
    out = tmp_path / "out"
    run = run_dpo("edit_dpo_lora.yaml", Q21_EDIT, data, tmp_path, batch=2)
    assert type(run.qwen).__name__ == "QwenImage21" and run.qwen.transformer.dtype == torch.bfloat16
    batch = next(iter(run.get_train_dataloader()))
    assert batch["references"].shapes == [(1, 4, 4)]  # a 32 px source at the tiny model's 64² px area
    assert batch["img_mask"].shape == batch["prompt_embeds"].shape[:2]
    assert batch["img_mask"].sum(1).tolist() == [4, 4]  # one slot per 2x2 of the 16 reference tokens
    assert len(_losses(run)) == 2 and all(np.isfinite(_losses(run)))
    assert lora_b_moved(load_file(out / "pytorch_lora_weights.safetensors")) > 0


def test_edit_nft_bf16_rolls_out_with_the_control_images(tmp_path):
    from align.data.edit import write_synthetic_edit_prompts

    prompts = write_synthetic_edit_prompts(tmp_path / "prompts", n=2, size=32)
    out = tmp_path / "out"
    run = train_main("nft", ["--config", str(ROOT / "recipes/tiny/edit_nft_lora.yaml"), *Q21_EDIT, "--dataset_name",
                             str(prompts), "--output_dir", str(out), "--max_steps", "1",
                             "--gradient_accumulation_steps", "1", "--disable_tqdm", "true"])
    assert type(run.qwen).__name__ == "QwenImage21" and run.qwen.edit_model
    assert run.qwen.text_encoder is None  # every row was encoded once with its control image, then released
    cond = run.rollouts.buffer[0].cond
    assert cond.references.shapes == [(1, 4, 4)] and cond.img_mask.sum(1).tolist() == [4] * 4
    assert np.isfinite(_losses(run)[0]) and lora_b_moved(load_file(out / "pytorch_lora_weights.safetensors")) > 0


# --------------------------------------------------------------------------- offline objectives
def test_full_fine_tuning_sft_bf16_writes_a_transformer_that_moved(tmp_path):
    from diffusers import QwenImage21Transformer2DModel

    from align.sft import main
    from qwen_image.qwen_image_21 import QwenImage21

    out = tmp_path / "out"
    run = main(["--config", str(ROOT / "recipes/tiny/sft_full.yaml"), *Q21, "--dataset_name",
                str(rated_images(tmp_path / "data")), "--min_raters", "0", "--cache_dir", str(tmp_path / "cache"),
                "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "1",
                "--learning_rate", "1e-2", "--logging_steps", "1"])
    assert run.qwen.transformer.dtype == torch.bfloat16
    assert len(_losses(run)) == 2 and all(np.isfinite(_losses(run)))
    trained = QwenImage21Transformer2DModel.from_pretrained(out, subfolder="transformer")
    base = QwenImage21.tiny(seed=0, dtype=torch.bfloat16).transformer.state_dict()
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, base[k])]
    assert any(".attn.to_q." in k for k in moved) and any("img_mlp" in k for k in moved)


def test_kto_lora_bf16_trains(tmp_path):
    from align.data.kto import write_synthetic_ratings

    data = write_synthetic_ratings(tmp_path / "data", n=8, size=32)
    out = tmp_path / "out"
    run = train_main("kto", ["--config", str(ROOT / "recipes/tiny/kto_lora.yaml"), *Q21, "--dataset_name", str(data),
                             "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), "--max_steps", "2",
                             "--eval_fraction", "0", "--eval_strategy", "no", "--logging_steps", "1",
                             "--per_device_train_batch_size", "2", "--kl_estimate", "mismatched",
                             "--learning_rate", "1e-2"])
    assert type(run.qwen).__name__ == "QwenImage21" and run.qwen.transformer.dtype == torch.bfloat16
    assert len(_losses(run, "loss/kto")) == 2 and all(np.isfinite(_losses(run, "loss/kto")))
    assert lora_b_moved(load_file(out / "pytorch_lora_weights.safetensors")) > 0


# --------------------------------------------------------------------------- online objectives
@pytest.mark.parametrize("method", ["nft", "awm", "dgpo"])
def test_forward_objective_lora_bf16_trains(method, tmp_path):
    out = tmp_path / "out"
    run = train_main(method, ["--config", TINY[method], *Q21, *ONLINE, "--output_dir", str(out), "--max_steps", "2",
                              "--beta", "0.01"])
    assert type(run.qwen).__name__ == "QwenImage21" and run.qwen.transformer.dtype == torch.bfloat16
    assert run.qwen.text_encoder is None  # the prompts were encoded once, then the encoder left
    assert len(_losses(run)) == 2 and all(np.isfinite(_losses(run)))
    if method != "nft":  # each buffer trained once, on-policy: the ratio is the current policy's, exactly 1
        assert _losses(run, "ratio/min")[0] == _losses(run, "ratio/max")[0] == 1.0
    assert lora_b_moved(load_file(out / "pytorch_lora_weights.safetensors")) > 0


def test_dpo_plus_nft_bf16_trains_both_terms(tmp_path):
    from align.data.preference import write_synthetic_pairs
    from align.dpo import main

    data = write_synthetic_pairs(tmp_path / "pairs", n=4, size=32)
    out = tmp_path / "out"
    run = main(["--config", str(ROOT / "recipes/tiny/dpo_nft.yaml"), *Q21, *ONLINE, "--dataset_name", str(data),
                "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), "--max_steps", "2",
                "--per_device_train_batch_size", "2", "--num_generations", "2", "--logging_steps", "1"])
    assert type(run.qwen).__name__ == "QwenImage21" and run.method == "nft"
    logs = [h for h in run.state.log_history if "loss/nft" in h]
    assert len(logs) == 2 and all(np.isfinite(h["loss/dpo"]) and np.isfinite(h["loss/nft"]) for h in logs)
    assert logs[0]["nft/old_deviation"] == 0.0
    assert lora_b_moved(load_file(out / "pytorch_lora_weights.safetensors")) > 0


# The Qwen-Image checks of test_forward_rl.py on the 2.1 family: adapters moved off zero (on != off), the extra
# adapters copied from the trained one, i.e. the state before the first update.
def test_nft_implicit_velocities_equal_the_trained_one_before_any_update_bf16(tmp_path):
    trainer = _bf16_trainer("nft", tmp_path, *Q21, "--train_prompts", *PROMPTS)
    assert type(trainer.qwen).__name__ == "QwenImage21"
    check_nft_implicit_velocities(trainer)


@pytest.mark.parametrize("method", ["awm", "dgpo"])
def test_ratios_are_exactly_one_before_any_update_bf16(method, tmp_path):
    trainer = _bf16_trainer(method, tmp_path, *Q21, "--train_prompts", *PROMPTS, "--num_iterations", "2")
    assert type(trainer.qwen).__name__ == "QwenImage21"
    check_ratios_exactly_one(trainer)


# --------------------------------------------------------------------------- kill -9 + resume
@pytest.mark.slow
def test_nft_kill_9_and_resume_last_is_bit_identical(tmp_path):
    # The Qwen-Image check (kill at a seeded random point after a checkpoint, resume, compare the adapter and
    # the old adapter bit for bit) with the 2.1 family in bf16.
    check_kill_and_resume("nft", tmp_path, (*Q21, "--train_prompts", *PROMPTS))
    keys = load_file(tmp_path / "killed" / "pytorch_lora_weights.safetensors").keys()
    assert any(".img_mlp.gate_layer.lora_A" in k for k in keys)  # 2.1's targets: the run was the 2.1 model
