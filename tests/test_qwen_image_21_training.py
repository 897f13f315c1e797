"""Qwen-Image-2.1 as a trainable model family (``--model_family qwen-image-2.1``) on its tiny random model in bf16
on CPU, through the normal launch path: SFT LoRA (its adapter loads in QwenImage21Pipeline, changes its output, and
our sampler with it equals the pipeline with it), Flow-DPO, Flow-GRPO (ratio exactly 1 before the first update),
kill -9 + ``--resume_from_checkpoint last``, and the family's numbers (LoRA targets, block class, estimator)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_helpers import rated_images
from lora_helpers import lora_b_moved
from run_helpers import child_env, kill_during_save
from safetensors.torch import load_file

from align.memory import Options, estimate
from align.models import family_of, get_model_family
from qwen_image.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SFT_RECIPE = str(ROOT / "recipes/tiny/q21_sft_lora.yaml")
Q21 = ["--model_family", "qwen-image-2.1", "--model_dtype", "bfloat16"]


# --------------------------------------------------------------------------- the family
def test_family_declares_21_targets_block_architecture_and_sizes():
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21TransformerBlock

    from align.configs.sft import SFTConfig
    from align.launch import parse_config
    from qwen_image.qwen_image_21 import LORA_TARGETS_21, architecture_21

    family = get_model_family("qwen-image-2.1")
    assert family.block_class() is QwenImage21TransformerBlock
    assert family.default_lora_targets == LORA_TARGETS_21
    config = parse_config(SFTConfig, ["--config", SFT_RECIPE, "--output_dir", "/tmp/unused-q21", "--resolution",
                                      "1024", "--per_device_train_batch_size", "1"])
    assert family_of(config) is family and not family.is_edit(config)
    assert get_model_family("qwen-image-2.1-edit").is_edit(config)
    assert family.identity(config) != get_model_family("qwen-image").identity(config)  # caches stay apart

    arch, ref = family.architecture(config), architecture_21()
    assert (arch.num_blocks, arch.inner_dim, arch.act_widths_per_token) == (ref.num_blocks, ref.inner_dim, 42.17)
    assert arch.block_params == ref.params_per_block
    qi = get_model_family("qwen-image").architecture(SimpleNamespace(model_name_or_path=None))
    options = Options.from_config(config)
    assert options.lora_targets == LORA_TARGETS_21
    est, est_qi = estimate(options, arch), estimate(options, qi)
    # 2.1: 32 blocks of width 3072 saving 42.17 widths per token; Qwen-Image: 60 blocks saving 34.5.
    tokens = (1024 // 16) ** 2 + options.text_tokens
    assert est.parts["activations"] * 2**30 >= 32 * tokens * 42.17 * arch.inner_dim * 2
    assert est.parts["weights"] < est_qi.parts["weights"] / 2
    assert est.caching["VAE"] == pytest.approx(ref.vae_params * 2 / 2**30)

    with pytest.raises(UserError, match="multiple of 32"):
        family.load(SimpleNamespace(resolution=48, model_name_or_path=None, tiny_seed=0, tiny_variant="t2i"),
                    torch.float32)
    with pytest.raises(UserError, match="tiny_variant"):
        family.is_edit(SimpleNamespace(model_name_or_path=None, tiny_variant="edit-2511"))


def test_qwen_image_2512_recipe_loads_a_checkpoint_through_the_qwen_image_family(tiny_checkpoint):
    from align.configs.sft import SFTConfig
    from align.launch import parse_config
    from qwen_image import QwenImage

    config = parse_config(SFTConfig, ["--config", str(ROOT / "recipes/qwen_image_2512/sft_lora.yaml"), "--output_dir",
                                      "/tmp/unused-2512", "--bf16", "false", "--use_cpu", "true",
                                      "--model_name_or_path", str(tiny_checkpoint)])
    family = family_of(config)
    assert family.name == "qwen-image" and not family.is_edit(config)
    qwen = family.load(config, torch.float32, load_text_encoder=False, load_vae=False)
    assert type(qwen) is QwenImage and qwen.transformer.config.num_layers >= 1


# --------------------------------------------------------------------------- SFT + the adapter in diffusers
def test_sft_lora_bf16_adapter_loads_in_the_pipeline_and_our_sampler_equals_it(tmp_path):
    from align.sft import main
    from qwen_image.qwen_image_21 import LORA_TARGETS_21, QwenImage21

    out = tmp_path / "out"
    run = main(["--config", SFT_RECIPE, *Q21, "--dataset_name", str(rated_images(tmp_path / "data")), "--cache_dir",
                str(tmp_path / "cache"), "--output_dir", str(out), "--max_steps", "3", "--learning_rate", "2e-2",
                "--validation_prompts", "[]", "--logging_steps", "1"])
    assert isinstance(run.qwen, QwenImage21) and run.qwen.transformer.dtype == torch.bfloat16
    losses = [h["loss"] for h in run.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))
    file = out / "pytorch_lora_weights.safetensors"
    state = load_file(file)
    layers = run.qwen.transformer.config.num_layers
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state}
    assert len(modules) == 7 * layers and {m.split(".", 2)[2] for m in modules} == set(LORA_TARGETS_21)
    assert lora_b_moved(state) > 0

    # The same tiny base in fp32: the diffusers pipeline with and without the adapter, and our sampler with it.
    base = QwenImage21.tiny(seed=0)
    pipe = base.pipeline()
    pipe.set_progress_bar_config(disable=True)
    latents = base.initial_noise(1, 64, 96, seed=1)
    kwargs = dict(prompt="a sign 1", height=64, width=96, num_inference_steps=3, output_type="latent",
                  output_resolution=64)
    before = pipe(latents=latents.clone(), **kwargs).images
    pipe.load_lora_weights(out, weight_name=file.name)
    after = pipe(latents=latents.clone(), **kwargs).images
    assert (after - before).abs().max() > 1e-4
    ours = QwenImage21.tiny(seed=0)
    ours.load_lora(file)
    sampled = ours.sample("a sign 1", 64, 96, num_inference_steps=3, latents=latents.clone()).latents
    assert (sampled - after).abs().max() <= 1e-5


# --------------------------------------------------------------------------- Flow-DPO
def run_dpo(recipe: str, model_args: list[str], data: Path, tmp_path: Path, batch: int):
    """Two Flow-DPO steps of ``recipes/tiny/<recipe>`` on tiny 2.1 (``model_args``) into ``tmp_path/out``."""
    from align.dpo import main

    return main(["--config", str(ROOT / "recipes/tiny" / recipe), *model_args, "--dataset_name", str(data),
                 "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                 "--per_device_train_batch_size", str(batch), "--eval_fraction", "0", "--eval_strategy", "no",
                 "--logging_steps", "1", "--learning_rate", "1e-2"])


def test_dpo_lora_bf16_trains(tmp_path):
    from align.data.preference import write_synthetic_pairs

    data = write_synthetic_pairs(tmp_path / "pairs", n=4, size=32)
    out = tmp_path / "out"
    run = run_dpo("dpo_lora.yaml", Q21, data, tmp_path, batch=1)
    assert run.qwen.transformer.dtype == torch.bfloat16 and type(run.qwen).__name__ == "QwenImage21"
    losses = [h["loss"] for h in run.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert lora_b_moved(load_file(out / "pytorch_lora_weights.safetensors")) > 0


# --------------------------------------------------------------------------- Flow-GRPO
def test_grpo_lora_bf16_first_ratio_is_exactly_one(tmp_path):
    from align.grpo import main

    out = tmp_path / "out"
    # Prompts of one token length: a 2.1 batch of mixed lengths shifts the text positions (batch-1 caveat).
    run = main(["--config", str(ROOT / "recipes/tiny/grpo_brightness.yaml"), *Q21, "--output_dir", str(out),
                "--train_prompts", '["a red cat", "a red dog"]', "--num_generations", "2",
                "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "2",
                "--finetune", "lora", "--lora_rank", "4", "--lora_alpha", "4", "--learning_rate", "3e-2",
                "--epsilon", "1e-4", "--num_inference_steps", "3", "--disable_tqdm", "true"])
    assert run.qwen.transformer.dtype == torch.bfloat16 and type(run.qwen).__name__ == "QwenImage21"
    logs = [h for h in run.state.log_history if "ratio/mean" in h]
    assert logs[0]["ratio/min"] == 1.0 and logs[0]["ratio/max"] == 1.0, logs[0]
    assert logs[0]["clip_fraction"] == 0.0
    assert lora_b_moved(load_file(out / "pytorch_lora_weights.safetensors")) > 0


# --------------------------------------------------------------------------- kill -9 + resume
@pytest.mark.slow
def test_sigkill_then_resume_last_matches_an_uninterrupted_sft_run(tmp_path):
    from align.sft import main

    args = ["--config", SFT_RECIPE, *Q21, "--dataset_name", str(rated_images(tmp_path / "data")), "--cache_dir",
            str(tmp_path / "cache"), "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
            "--caption_dropout", "0.5", "--validation_prompts", "[]", "--logging_steps", "1", "--learning_rate",
            "1e-2"]
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", kill_during_save(2), *args, "--output_dir", str(killed)],
                          env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in killed.iterdir() if "checkpoint" in p.name) == [".incomplete-checkpoint-2",
                                                                                  "checkpoint-1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process: "bit-identical" compares the last bits of the sums
    try:
        resumed = main([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "last"])
        full = main([*args, "--output_dir", str(tmp_path / "full")])
    finally:
        torch.set_num_threads(threads)
    assert resumed.state.global_step == full.state.global_step == 3
    a = load_file(killed / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and lora_b_moved(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
