"""Edit SFT on the tiny Edit-2509/2511 models: row checks, the cache key, a LoRA run whose adapter loads into
``QwenImageEditPlusPipeline`` and lowers the edit loss, and exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
import numpy as np
import pytest
import torch
from data_helpers import blocky_image
from datasets import Dataset, List
from datasets import Image as ImageFeature
from safetensors.torch import load_file

from align.data.edit import CONTROLS, REFERENCE_LATENTS, control_problem, encode_edit_dataset, load_edit_dataset
from align.data.loading import validate_rows
from align.losses import make_noisy, velocity_error
from qwen_image import QwenImage, pack
from qwen_image.latents import img_shapes
from qwen_image.sampling import predict_velocity

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
RES = 32
PROMPTS = ['replace the text with "OPEN"', 'replace the text with "SALE"']


def _write_rows(root: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return root


@pytest.fixture(scope="module")
def edit_dir(tmp_path_factory):
    """Two kept rows (one with 2 controls) and one dropped by the rater filter."""
    root = tmp_path_factory.mktemp("edit_data")
    for i in range(6):
        blocky_image(i).save(root / f"{i}.png")
    return _write_rows(root, [
        {"file_name": "0.png", "prompt": PROMPTS[0], "control_image": "3.png", "ratings": [5, 5, 4]},
        {"file_name": "1.png", "prompt": PROMPTS[1], "control_image": "4.png", "control_image_1": "5.png",
         "ratings": [5, 5, 5]},
        {"file_name": "2.png", "prompt": "make it dull", "control_image": "3.png", "ratings": [2, 2, 2]},
    ])


def _checked(folder, skip=False, expected=0):
    raw = load_edit_dataset(str(folder))
    return validate_rows(raw, ["image"], "prompt", skip, extra_check=lambda r: control_problem(r, expected))


def test_control_image_rows_are_checked(edit_dir, tmp_path):
    ds, summary = _checked(edit_dir)
    assert summary.kept == 3 and [len(c) for c in ds[CONTROLS]] == [1, 2, 1]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for i in range(4):
        blocky_image(i).save(tmp_path / f"{i}.png")
    cases = [
        ({"control_image": "nope.png"}, "control image 1: image not found"),
        ({"control_image": "bad.png"}, "control image 1: unreadable image"),
        ({"control_images": ["1.png", "2.png", "3.png", "0.png"]}, "4 control images; Edit-2509/2511 take 1 to 3"),
        ({"control_image": "1.png", "control_image_2": "2.png"}, "control image 2 of 3 is empty"),
        ({"control_images": []}, "no control image"),
    ]
    for extra, text in cases:
        folder = _write_rows(tmp_path, [{"file_name": "0.png", "prompt": "x", **extra}])
        with pytest.raises(ValueError, match=text) as info:
            _checked(folder)
        assert "\n" not in str(info.value) and "--skip_bad_rows" in str(info.value)
    with pytest.raises(ValueError, match="expected 1"):
        _checked(edit_dir, expected=1)  # the 2-control row
    ds, summary = _checked(edit_dir, skip=True, expected=1)
    assert summary.kept == 2 and summary.dropped == {"bad_row": 1}
    with pytest.raises(ValueError, match="no control image column"):
        load_edit_dataset(str(_write_rows(tmp_path, [{"file_name": "0.png", "prompt": "x"}])))


def test_datasets_list_column_and_cache_key_includes_the_control_images(edit_dir, tmp_path):
    qwen = QwenImage.tiny_edit("2509")
    ds = Dataset.from_dict({"prompt": PROMPTS, "image": [blocky_image(0), blocky_image(1)],
                            "control_images": [[blocky_image(3)], [blocky_image(4), blocky_image(5)]]})
    ds = ds.cast_column("image", ImageFeature()).cast_column("control_images", List(ImageFeature()))
    ds.save_to_disk(tmp_path / "hf")
    from_hf, _ = _checked(tmp_path / "hf")
    from_folder, _ = _checked(edit_dir)
    cache = str(tmp_path / "cache")
    enc_hf = encode_edit_dataset(from_hf, qwen, "tiny", cache, resolution=RES)
    enc_folder = encode_edit_dataset(from_folder.select([0, 1]), qwen, "tiny", cache, resolution=RES)
    for a, b in zip(enc_hf, enc_folder):  # same rows in two formats encode alike
        torch.testing.assert_close(a["prompt_embeds"], b["prompt_embeds"], atol=1e-6, rtol=0)
        torch.testing.assert_close(a[REFERENCE_LATENTS], b[REFERENCE_LATENTS], atol=1e-6, rtol=0)
    assert enc_hf[1][REFERENCE_LATENTS].shape[0] == 2 * 16  # two 64x64 references, 16 tokens each
    # Same instruction, other control image: other embeddings (the cache keys on the images too).
    swapped = Dataset.from_dict({"prompt": [PROMPTS[0]], "image": [blocky_image(0)], "control_images": [[blocky_image(5)]]})
    swapped = swapped.cast_column("image", ImageFeature()).cast_column("control_images", List(ImageFeature()))
    enc_swapped = encode_edit_dataset(_checked_ds(swapped, tmp_path / "hf2"), qwen, "tiny", cache, resolution=RES)
    assert not torch.allclose(enc_swapped[0]["prompt_embeds"], enc_hf[0]["prompt_embeds"])
    calls = []
    handle = qwen.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = encode_edit_dataset(from_hf, qwen, "tiny", cache, resolution=RES)  # from the on-disk cache
    finally:
        handle.remove()
    assert calls == [] and torch.equal(again[0]["prompt_embeds"], enc_hf[0]["prompt_embeds"])


def _checked_ds(ds, path):
    ds.save_to_disk(path)
    return _checked(path)[0]


def edit_loss(transformer, qwen: QwenImage) -> float:
    """Flow-matching loss of the two training edits at 6 fixed (sigma, noise) draws."""
    controls = [[blocky_image(3)], [blocky_image(4), blocky_image(5)]]
    total = 0.0
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for i in range(2):
            x0 = pack(qwen.encode_images([blocky_image(i)], RES, RES)).float()
            cond = qwen.conditioning([PROMPTS[i]], [controls[i]])
            for s in torch.linspace(0.15, 0.9, 6):
                noisy, target = make_noisy(x0, torch.randn(x0.shape, generator=g), s.repeat(1))
                v = predict_velocity(transformer, noisy, s.repeat(1), cond, img_shapes(1, RES, RES))
                total += velocity_error(v, target).mean().item()
    return total / 12


def run_main(argv):
    from align.sft import main

    return main(argv)


def common_args(data, cache, out) -> list[str]:
    return ["--config", str(ROOT / "recipes/tiny/edit_sft_lora.yaml"), "--dataset_name", str(data),
            "--output_dir", str(out), "--cache_dir", str(cache), "--min_raters", "3", "--logging_steps", "1"]


def test_edit_lora_sft_two_process_ddp_from_an_edit_checkpoint_loads_into_edit_plus_and_lowers_the_loss(
        edit_dir, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    QwenImage.tiny_edit("2509").save_pretrained(ckpt)
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", str(ROOT / "align/sft.py"), *common_args(edit_dir, tmp_path / "cache", out),
           "--model_name_or_path", str(ckpt), "--model_dtype", "float32", "--max_steps", "12",
           "--learning_rate", "1e-2", "--lora_rank", "8", "--lora_alpha", "8", "--per_device_train_batch_size", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["world_size"] == 2  # real 2-process DDP
    assert (summary["kept"], summary["total"], summary["dropped"]) == (2, 3, {"low_score": 1})

    base = QwenImage.from_pretrained(ckpt, torch_dtype="float32")
    monkeypatch.setattr(edit_plus, "CONDITION_IMAGE_SIZE", base.edit_condition_area)
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", base.edit_reference_area)
    pipe = base.pipeline("edit")
    pipe.set_progress_bar_config(disable=True)

    def pipeline_image():
        return pipe(image=[blocky_image(3)], prompt=PROMPTS[0], negative_prompt=" ", height=RES, width=RES,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    before_img, before_loss = pipeline_image(), edit_loss(pipe.transformer, base)
    pipe.load_lora_weights(str(out))
    after_img, after_loss = pipeline_image(), edit_loss(pipe.transformer, base)
    assert np.abs(after_img - before_img).max() > 1e-3
    assert after_loss < before_loss * 0.97, (before_loss, after_loss)


def test_edit_sft_resume_matches_an_uninterrupted_run(edit_dir, tmp_path):
    args = ["--max_steps", "4", "--per_device_train_batch_size", "1", "--learning_rate", "1e-2",
            "--save_strategy", "steps", "--save_steps", "2"]
    full = run_main([*common_args(edit_dir, tmp_path / "cache", tmp_path / "a"), *args])
    assert full.qwen.transformer.config.zero_cond_t and full.data.edit  # the recipe's Edit-2511 layout
    batch = next(iter(full.get_train_dataloader()))
    assert batch["references"].shapes in ([(1, 4, 4)], [(1, 4, 4), (1, 4, 4)])  # 64x64 px controls reach the loss
    resumed = run_main([*common_args(edit_dir, tmp_path / "cache", tmp_path / "b"), *args,
                        "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-2")])
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert resumed.state.global_step == 4 and losses(resumed)[-2:] == losses(full)[-2:]
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_edit_sft_rejects_what_it_does_not_support_yet(edit_dir, tmp_path):
    from align.configs.sft import SFTConfig
    from align.data.sft import check_edit_config
    from align.launch import parse_config

    config = parse_config(SFTConfig, [*common_args(edit_dir, tmp_path / "cache", tmp_path / "c"), "--caption_dropout", "0.1",
                                      "--random_flip", "true"])
    with pytest.raises(ValueError, match="edit SFT does not support caption_dropout, random_flip yet"):
        check_edit_config(config)
