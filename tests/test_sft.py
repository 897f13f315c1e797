"""SFT end to end on the tiny model: 2-process DDP LoRA run (adapter loads into diffusers and lowers the loss on
the training batch), full fine-tuning in one process, exact resume, phases/buckets/flip/caption dropout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import blocky_image
from safetensors.torch import load_file

from align.data.buckets import bucket_sizes
from align.losses import make_noisy, velocity_error
from qwen_image import QwenImage, pack
from qwen_image.latents import img_shapes
from qwen_image.sampling import predict_velocity

ROOT = Path(__file__).resolve().parents[1]
RES = 32
PROMPTS = ["a red square that says \"HI\"", "a blue square that says \"YO\""]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two kept rows (3 raters, mean >= 4.5) and one dropped (mean 3): the filter runs in every launch."""
    root = tmp_path_factory.mktemp("sft_data")
    rows = [("a.png", PROMPTS[0], [5, 5, 4]), ("b.png", PROMPTS[1], [4.5, 4.5, 4.5]), ("c.png", "a dull photo", [3, 3, 3])]
    with open(root / "metadata.jsonl", "w") as fh:
        for i, (name, prompt, ratings) in enumerate(rows):
            blocky_image(i).save(root / name)
            fh.write(json.dumps({"file_name": name, "prompt": prompt, "ratings": ratings, "language": "en"}) + "\n")
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sft_cache"))


def fixed_batch_loss(transformer) -> float:
    """Flow-matching loss of the training images at 6 fixed (sigma, noise) draws: the same for every model."""
    qwen = QwenImage.tiny(seed=0)
    x0 = pack(qwen.encode_images([blocky_image(0), blocky_image(1)], RES, RES)).float()
    cond = qwen.conditioning(PROMPTS)
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for s in torch.linspace(0.15, 0.9, 6):
            sigma = s.repeat(2)
            noisy, target = make_noisy(x0, torch.randn(x0.shape, generator=g), sigma)
            v = predict_velocity(transformer, noisy, sigma, cond, img_shapes(2, RES, RES))
            total += velocity_error(v, target).mean().item()
    return total / 6


def pipeline_image(pipe) -> np.ndarray:
    return pipe(PROMPTS[0], height=RES, width=RES, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


def common_args(data_dir, cache_dir, out) -> list[str]:
    return ["--dataset_name", str(data_dir), "--output_dir", str(out), "--cache_dir", cache_dir, "--resolution", str(RES),
            "--report_to", "none", "--logging_steps", "1", "--seed", "0", "--use_cpu", "true",
            "--dataloader_num_workers", "0", "--caption_dropout", "0", "--aspect_ratio_buckets", "false"]


def test_lora_two_process_ddp_adapter_loads_in_diffusers_and_lowers_the_loss(data_dir, cache_dir, tmp_path, tiny_checkpoint):
    out = tmp_path / "lora"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "align/sft.py"),
           "--config", str(ROOT / "recipes/tiny/sft_lora.yaml"), *common_args(data_dir, cache_dir, out),
           "--report_to", "wandb", "--per_device_train_batch_size", "1", "--max_steps", "12", "--learning_rate", "1e-2",
           "--lora_rank", "8", "--lora_alpha", "8", "--validation_steps", "6", "--export_comfyui", "true"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["world_size"] == 2  # real 2-process DDP, not one process
    assert (summary["kept"], summary["total"], summary["dropped"]) == (2, 3, {"low_score": 1})
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step000006_0.png", "step000012_0.png"]
    assert list(Path(tmp_path, "wandb").glob("offline-run-*")), "wandb offline run missing"
    comfy = load_file(out / "pytorch_lora_weights_comfyui.safetensors")
    assert all(k.startswith("diffusion_model.") for k in comfy)

    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(tiny_checkpoint))
    before_img, before_loss = pipeline_image(pipe), fixed_batch_loss(pipe.transformer)
    pipe.load_lora_weights(str(out))
    after_img, after_loss = pipeline_image(pipe), fixed_batch_loss(pipe.transformer)
    assert np.abs(after_img - before_img).max() > 1e-3
    assert after_loss < before_loss * 0.97, (before_loss, after_loss)


def run_main(argv):
    from align.sft import main

    return main(argv)


def test_full_finetune_one_process_saves_a_diffusers_transformer(data_dir, cache_dir, tmp_path, tiny_checkpoint):
    out = tmp_path / "full"
    run_main(["--config", str(ROOT / "recipes/tiny/sft_full.yaml"), *common_args(data_dir, cache_dir, out),
              "--max_steps", "12", "--learning_rate", "2e-3", "--per_device_train_batch_size", "2",
              "--gradient_checkpointing", "true"])
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    tuned = QwenImageTransformer2DModel.from_pretrained(str(out), subfolder="transformer")
    pipe = QwenImagePipeline.from_pretrained(str(tiny_checkpoint))
    before_img, before_loss = pipeline_image(pipe), fixed_batch_loss(pipe.transformer)
    pipe.transformer = tuned
    after_img, after_loss = pipeline_image(pipe), fixed_batch_loss(tuned)
    assert np.abs(after_img - before_img).max() > 1e-3
    assert after_loss < before_loss * 0.97, (before_loss, after_loss)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(data_dir, cache_dir, tmp_path):
    args = ["--config", str(ROOT / "recipes/tiny/sft_lora.yaml"), "--validation_prompts", "[]",
            "--max_steps", "4", "--per_device_train_batch_size", "1", "--learning_rate", "1e-2", "--caption_dropout", "0.5",
            "--save_strategy", "steps", "--save_steps", "2"]
    full = run_main([*args, *common_args(data_dir, cache_dir, tmp_path / "a"), "--caption_dropout", "0.5"])
    assert (tmp_path / "a" / "checkpoint-2").is_dir()
    resumed = run_main([*args, *common_args(data_dir, cache_dir, tmp_path / "b"), "--caption_dropout", "0.5",
                        "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-2")])
    assert resumed.state.global_step == full.state.global_step == 4
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert len(losses(full)) == 4 and losses(resumed)[-2:] == losses(full)[-2:]  # steps 3-4, recomputed after resume
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_phases_buckets_flip_and_lr_scale(tmp_path, cache_dir):
    root = tmp_path / "mixed"
    root.mkdir()
    rows = [("w.png", (48, 32), "real"), ("t.png", (32, 48), "real"), ("s.png", (32, 32), "synthetic"), ("s2.png", (40, 40), "synthetic")]
    with open(root / "metadata.jsonl", "w") as fh:
        for i, (name, size, source) in enumerate(rows):
            blocky_image(i, size).save(root / name)
            fh.write(json.dumps({"file_name": name, "prompt": f"p {name}", "ratings": [5, 5, 5], "source": source}) + "\n")
    phases = json.dumps([{"until": 0.5, "resolution": 32, "synthetic_fraction": 1.0},
                         {"until": 1.0, "resolution": 48, "synthetic_fraction": 0.0, "lr_scale": 0.5}])
    seen = []

    from align.trainers import sft

    original = sft.SFTTrainer.compute_loss

    def spy(self, model, inputs, *a, **k):
        seen.append((self.state.global_step, inputs["height"], inputs["width"], tuple(inputs["source"]), tuple(inputs["flip"])))
        return original(self, model, inputs, *a, **k)

    sft.SFTTrainer.compute_loss = spy
    try:
        trainer = run_main(["--config", str(ROOT / "recipes/tiny/sft_lora.yaml"), "--validation_prompts", "[]",
                            *common_args(root, cache_dir, tmp_path / "out"), "--aspect_ratio_buckets", "true",
                            "--random_flip", "true", "--caption_dropout", "0.5", "--phases", phases,
                            "--max_steps", "8", "--per_device_train_batch_size", "1"])
    finally:
        sft.SFTTrainer.compute_loss = original
    early = [s for s in seen if s[0] < 4]
    late = [s for s in seen if s[0] >= 4]
    assert early and late
    assert {src for *_, src, _ in early} == {("synthetic",)} and {src for *_, src, _ in late} == {("real",)}
    assert {(h, w) for _, h, w, _, _ in early} <= set(bucket_sizes(32))
    assert {(h, w) for _, h, w, _, _ in late} <= set(bucket_sizes(48))
    assert len({(h, w) for _, h, w, _, _ in late}) == 2  # the wide and the tall image keep their own buckets
    assert {f for *_, f in seen} == {(False,), (True,)}  # both the image and its mirror are trained
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(5e-4)
    assert [h["phase"] for h in trainer.state.log_history if "phase" in h][::4] == [0.0, 1.0]
