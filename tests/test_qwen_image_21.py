"""Qwen-Image-2.1 (tiny random model, real classes) against QwenImage21Pipeline; Qwen-Image-2512 loading."""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import QwenImage21Pipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from qwen_image import QwenImage, QwenImageInputError
from qwen_image.qwen_image_21 import (
    LORA_TARGETS_21,
    T2I_TEMPLATE,
    VISION_BLOCK,
    QwenImage21,
    architecture_21,
    images_to_pixels,
    is_qwen_image_21_checkpoint,
    lora_config_21,
    predict_velocity_21,
    save_lora_21,
)
from qwen_image.sampling import sde_step

PROMPT = "a red fox reading a newspaper, the headline says 新品"
EDIT = 'replace "Latte" with "拿铁"'
RES = 64  # the tiny model's default size: the pipeline's output_resolution


def _image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = 4 if mode == "RGBA" else 3
    arr = np.random.RandomState(seed).randint(0, 255, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr, mode=mode)


# Non-square condition images of different aspect ratios (40x72 -> 32x96 px, 64x48 -> 64x64 at 64² px).
REFS = [_image(40, 72, 0), _image(64, 48, 1)]


@pytest.fixture(scope="module")
def model():
    return QwenImage21.tiny(seed=0)


@pytest.fixture(scope="module")
def pipe(model):
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("qwen_image_21"))


def _with_transformer(model, transformer) -> QwenImage21:
    """The same text encoder, VAE and processor around another transformer (cheaper than a new tiny model)."""
    return QwenImage21(transformer, model.vae, model.text_encoder, model.processor, default_size=RES)


def _pipe_latents(pipe, latents, **kwargs):
    return pipe(latents=latents.clone(), output_type="latent", output_resolution=RES, **kwargs).images


# --------------------------------------------------------------------------- prompt encoding
def test_templates_and_dropped_tokens_are_the_pipelines(model, pipe):
    assert T2I_TEMPLATE == pipe.prompt_template_t2i
    assert T2I_TEMPLATE.format(VISION_BLOCK.format(1) + "{}") == pipe.prompt_template_ti2i
    assert model.prompt_encoder.drop_tokens == pipe._drop_idx == 14
    assert model.prompt_encoder.image_token_id == pipe._img_token_id


def test_prompt_embeddings_equal_encode_prompt_bit_for_bit(model, pipe):
    embeds, mask, slots = pipe.encode_prompt(PROMPT)
    cond = model.conditioning(PROMPT)
    assert torch.equal(cond.embeds, embeds) and cond.mask is None and mask is None
    assert torch.equal(cond.img_mask, slots) and not slots.any()
    # A batch of prompts of different lengths: right-padded, masked; each row is that prompt's own encoding.
    batch = model.conditioning([PROMPT, "fox"])
    short, _, _ = pipe.encode_prompt("fox")
    n = short.shape[1]
    assert torch.equal(batch.embeds[1, :n], short[0]) and not batch.embeds[1, n:].any()
    assert batch.mask[1].tolist() == [1] * n + [0] * (batch.mask.shape[1] - n)


def test_edit_prompt_embeddings_equal_encode_prompt_bit_for_bit(model, pipe):
    # An RGBA condition image: the text encoder sees it over white, the VAE reads all four channels.
    refs = [REFS[0], _image(64, 48, 2, "RGBA")]
    resized, sizes = model.condition_images(refs, 1)
    assert sizes == [[(32, 96), (64, 64)]] and all(im.mode == "RGBA" for im in resized[0])
    embeds, mask, slots = pipe.encode_prompt(EDIT, image=resized[0])
    cond = model.conditioning(EDIT, refs)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.img_mask, slots)
    # One slot per 2x2 latent tokens of each condition image: (2*6 + 4*4) / 4 slots... of 16 px tokens.
    assert int(slots.sum()) == (32 // 16) * (96 // 16) // 4 + (64 // 16) * (64 // 16) // 4
    assert cond.references.shapes == [(1, 2, 6), (1, 4, 4)]
    assert cond.references.latents.shape == (1, 12 + 16, 64)


def test_the_pre_norm_hook_is_what_the_embeddings_read(model):
    """Without the hook transformers 5 returns the final-norm output: different embeddings."""
    encoder = model.prompt_encoder
    inputs = model.processor(text=[T2I_TEMPLATE.format(PROMPT)], return_tensors="pt")
    normed = model.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1][0, encoder.drop_tokens:]
    ours = model.conditioning(PROMPT).embeds[0]
    assert ours.shape == normed.shape and (ours - normed).abs().max() > 1e-2


# --------------------------------------------------------------------------- latents (RGBA VAE)
def test_rgb_images_get_an_opaque_alpha_and_decode_modes(model):
    rgb = _image(64, 96, 3)
    pixels = images_to_pixels([rgb], 64, 96)
    assert pixels.shape == (1, 4, 1, 64, 96) and torch.all(pixels[:, 3] == 1)
    transparent = rgb.convert("RGBA")
    transparent.putalpha(0)
    latents = model.encode_images([rgb, transparent], 64, 96)
    assert latents.shape == (2, 64, 1, 4, 6)
    assert not torch.allclose(latents[0], latents[1])  # the alpha reaches the VAE
    rgba = model.decode_latents(latents, mode="RGBA")
    flat = model.decode_latents(model.pack(latents), 64, 96)
    assert rgba[0].mode == "RGBA" and flat[0].mode == "RGB" and flat[0].size == (96, 64)
    expected = Image.alpha_composite(Image.new("RGBA", rgba[0].size, (255, 255, 255, 255)), rgba[0]).convert("RGB")
    assert np.array_equal(np.asarray(flat[0]), np.asarray(expected))
    with pytest.raises(QwenImageInputError):
        model.encode_images([rgb], 64, 80)  # 2.1 needs multiples of 32 px


def test_decode_equals_the_pipeline_output(model, pipe):
    latents = model.initial_noise(1, 64, 96, seed=5)
    ref = pipe(PROMPT, height=64, width=96, num_inference_steps=2, latents=latents.clone(), output_type="np",
               output_resolution=RES).images[0]
    ours = model.sample(PROMPT, 64, 96, num_inference_steps=2, latents=latents.clone()).latents
    decoded = np.asarray(model.decode_latents(ours, 64, 96, mode="RGBA")[0], dtype=np.float32) / 255
    assert ref.shape == (64, 96, 4) and np.abs(decoded - ref).max() <= 1 / 255 + 1e-6


# --------------------------------------------------------------------------- sampler == pipeline
@pytest.mark.parametrize("height,width", [(64, 96), (96, 32)])
def test_t2i_sampler_equals_pipeline(model, pipe, height, width):
    latents = model.initial_noise(1, height, width, seed=3)
    ref = _pipe_latents(pipe, latents, prompt=PROMPT, height=height, width=width, num_inference_steps=3)
    ours = model.sample(PROMPT, height, width, num_inference_steps=3, latents=latents.clone()).latents
    assert (ours - ref).abs().max() <= 1e-5 and (ours - latents).abs().max() > 1e-2
    no_cache = model.sample(PROMPT, height, width, num_inference_steps=3, latents=latents.clone(),
                            use_kv_cache=False).latents
    assert (no_cache - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("n_refs", [1, 2])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_edit_sampler_equals_pipeline(model, pipe, n_refs, cfg):
    negative = " " if cfg > 1 else None
    height, width = model.default_target_size(REFS[:n_refs])
    latents = model.initial_noise(1, height, width, seed=4)
    ref = _pipe_latents(pipe, latents, prompt=EDIT, image=REFS[:n_refs], negative_prompt=negative,
                        true_cfg_scale=cfg, num_inference_steps=3)
    ours = model.sample(EDIT, num_inference_steps=3, latents=latents.clone(), images=REFS[:n_refs],
                        true_cfg_scale=cfg, negative_prompt=negative).latents
    assert (ours - ref).abs().max() <= 1e-5 and (ours - latents).abs().max() > 1e-2


def test_condition_kv_cache_runs_only_target_tokens_after_the_first_step(model):
    lengths = []
    hook = model.transformer.transformer_blocks[0].register_forward_hook(
        lambda module, args, kwargs, out: lengths.append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
    try:
        model.sample(EDIT, 64, 64, num_inference_steps=3, images=REFS[:1])
    finally:
        hook.remove()
    target = (64 // 16) ** 2
    assert lengths[0] > target + 12 and lengths[1:] == [target, target]


def test_sde_noise_level_zero_is_the_ode_and_log_probs_recompute(model):
    kwargs = dict(num_inference_steps=4, seed=[7, 8], use_kv_cache=False)
    ode = model.sample([PROMPT, "fox"], 64, 64, **kwargs).latents
    zero = model.sample([PROMPT, "fox"], 64, 64, noise_level=0.0, sde_window=(0, 2), **kwargs).latents
    assert torch.equal(ode, zero)
    out = model.sample([PROMPT, "fox"], 64, 64, noise_level=0.7, sde_window=(1, 3), record=True, **kwargs)
    assert out.sde_steps == [1, 2] and (out.latents - ode).abs().max() > 1e-3
    assert torch.all(out.log_probs[:, [0, 3]] == 0) and torch.all(out.log_probs[:, [1, 2]] != 0)
    # What GRPO training does: recompute a stored transition's log-prob with a full forward.
    cond = model.conditioning([PROMPT, "fox"])
    j = 2
    v = predict_velocity_21(model.transformer, out.trajectory[j], out.sigmas[j], cond, model.img_shapes(2, 64, 64))
    step = sde_step(out.trajectory[j], v, float(out.sigmas[j]), float(out.sigmas[j + 1]), 0.7,
                    float(out.sigmas[1]), prev_sample=out.trajectory[j + 1])
    torch.testing.assert_close(step.log_prob, out.log_probs[:, j], rtol=0, atol=1e-5)


def test_precomputed_prompts_survive_releasing_the_text_encoder(model):
    bundle = _with_transformer(model, model.transformer)
    assert bundle.prompt_encoder.precompute([PROMPT, "fox", PROMPT], images=None) == 2
    bundle.prompt_encoder.precompute([EDIT], [[model.condition_images(REFS[:1], 1)[0][0][0]]])
    expected = model.conditioning([PROMPT, "fox"]).embeds
    edit_expected = model.conditioning(EDIT, REFS[:1])
    bundle.text_encoder = bundle.prompt_encoder.text_encoder = None
    assert torch.equal(bundle.conditioning([PROMPT, "fox"]).embeds, expected)
    edit = bundle.conditioning(EDIT, REFS[:1])
    assert torch.equal(edit.embeds, edit_expected.embeds) and torch.equal(edit.img_mask, edit_expected.img_mask)
    with pytest.raises(QwenImageInputError, match="released"):
        bundle.conditioning(["a prompt nobody encoded"])


def test_bf16_rollout_log_probs_recompute_exactly_without_the_cache():
    """GRPO's first ratio is exactly 1 in bf16: a full-forward recompute of each SDE step gives the stored bits."""
    model = QwenImage21.tiny(seed=1, dtype="bfloat16")
    prompts = [PROMPT, "fox"]
    out = model.sample(prompts, 64, 64, num_inference_steps=3, seed=[1, 2], noise_level=0.7, record=True,
                       use_kv_cache=False)
    cond = model.conditioning(prompts)
    assert cond.embeds.dtype == torch.bfloat16 and out.latents.dtype == torch.bfloat16
    for j in out.sde_steps:
        x = out.trajectory[j]
        v = predict_velocity_21(model.transformer, x, out.sigmas[j], cond, model.img_shapes(2, 64, 64))
        step = sde_step(x, v, float(out.sigmas[j]), float(out.sigmas[j + 1]), 0.7, float(out.sigmas[1]),
                        prev_sample=out.trajectory[j + 1])
        assert torch.equal(step.log_prob, out.log_probs[:, j])


# --------------------------------------------------------------------------- save / load
def test_tiny_checkpoint_round_trips(model, checkpoint):
    tmp_path = checkpoint
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImage21Pipeline" and index["processor"] == ["transformers", "Qwen3VLProcessor"]
    assert is_qwen_image_21_checkpoint(tmp_path)
    loaded = QwenImage21.from_pretrained(tmp_path, torch_dtype="float32")
    assert loaded.default_size == RES and loaded.prompt_encoder.drop_tokens == 14
    for a, b in zip(model.transformer.state_dict().values(), loaded.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(loaded.conditioning(PROMPT).embeds, model.conditioning(PROMPT).embeds)
    # The diffusers pipeline loads the folder too (the processor passed in: without torchvision its video
    # processor cannot be built) and samples what our sampler samples on the loaded model.
    pipe = QwenImage21Pipeline.from_pretrained(tmp_path, processor=loaded.processor)
    pipe.set_progress_bar_config(disable=True)
    latents = loaded.initial_noise(1, 64, 96, seed=1)
    ref = _pipe_latents(pipe, latents, prompt=PROMPT, height=64, width=96, num_inference_steps=2)
    ours = loaded.sample(PROMPT, 64, 96, num_inference_steps=2, latents=latents.clone()).latents
    assert (ours - ref).abs().max() <= 1e-5


def test_qwen_image_2512_style_checkpoint_loads_through_qwen_image(tiny_checkpoint, tmp_path):
    """Qwen-Image-2512 is a checkpoint of Qwen-Image's classes: the same loader, not the 2.1 one."""
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline" and not is_qwen_image_21_checkpoint(tiny_checkpoint)
    loaded = QwenImage.from_pretrained(tiny_checkpoint, torch_dtype="float32")
    assert type(loaded.transformer).__name__ == "QwenImageTransformer2DModel" and not loaded.edit_model
    with pytest.raises(QwenImageInputError, match="QwenImage"):
        QwenImage21.from_pretrained(tiny_checkpoint)
    with pytest.raises(QwenImageInputError, match="does not exist"):
        QwenImage21.from_pretrained(tmp_path / "missing")


# --------------------------------------------------------------------------- LoRA
def test_lora_targets_the_seven_block_linears(model):
    from peft import inject_adapter_in_model

    transformer = inject_adapter_in_model(lora_config_21(rank=4), copy.deepcopy(model.transformer))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A" in n}
    layers = model.transformer.config.num_layers
    assert len(wrapped) == 7 * layers
    assert {n.split(".", 2)[2] for n in wrapped} == set(LORA_TARGETS_21)


def test_lora_export_loads_in_the_pipeline_and_our_sampler_equals_it(model, pipe, tmp_path):
    trained = _with_transformer(model, copy.deepcopy(model.transformer))
    trained.transformer.add_adapter(lora_config_21(rank=4, alpha=8, init_lora_weights=False))
    file = save_lora_21(trained.transformer, tmp_path)
    latents = model.initial_noise(1, 64, 96, seed=2)
    kwargs = dict(prompt=PROMPT, height=64, width=96, num_inference_steps=3)
    base = _pipe_latents(pipe, latents, **kwargs)

    adapted_pipe = _with_transformer(model, copy.deepcopy(model.transformer)).pipeline()
    adapted_pipe.set_progress_bar_config(disable=True)
    adapted_pipe.load_lora_weights(tmp_path, weight_name=file.name)
    with_lora = _pipe_latents(adapted_pipe, latents, **kwargs)
    assert (with_lora - base).abs().max() > 1e-3

    ours = _with_transformer(model, copy.deepcopy(model.transformer))
    ours.load_lora(file)
    sampled = ours.sample(PROMPT, 64, 96, num_inference_steps=3, latents=latents.clone()).latents
    assert (sampled - with_lora).abs().max() <= 1e-5
    trained_out = trained.sample(PROMPT, 64, 96, num_inference_steps=3, latents=latents.clone()).latents
    assert (trained_out - with_lora).abs().max() <= 1e-5

    # The same adapter in kohya/musubi keys (underscored names, lora_down/up, alpha per module) loads the same.
    kohya = {}
    for key, value in load_file(file).items():
        module, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    musubi = _with_transformer(model, copy.deepcopy(model.transformer))
    musubi.load_lora(tmp_path / "kohya.safetensors")
    assert (musubi.sample(PROMPT, 64, 96, num_inference_steps=3, latents=latents.clone()).latents
            - with_lora).abs().max() <= 1e-5


# --------------------------------------------------------------------------- architecture numbers
def test_architecture_of_the_released_config_and_of_a_checkpoint(model, checkpoint):
    arch = architecture_21()
    assert (arch.num_blocks, arch.inner_dim, arch.num_heads, arch.head_dim) == (32, 4096, 32, 128)
    assert arch.mlp_hidden_size == 3 * 4096 and arch.context_in_dim == arch.text_encoder_hidden_size == 4096
    assert arch.params_per_block == 4 * 4096**2 + 3 * 4096 * 12288 + 2 * 128
    assert arch.num_blocks * arch.params_per_block + arch.non_block_params == arch.transformer_params
    assert 6.9e9 < arch.transformer_params < 7.3e9
    assert 0.3e9 < arch.vae_params < 0.36e9 and arch.vae_z_dim == 64
    assert 8e9 < arch.text_encoder_params < 9.5e9 and arch.text_encoder_lm_params < arch.text_encoder_params
    assert arch.image_tokens(1024, 1024) == 4096
    tiny = architecture_21(checkpoint)
    assert (tiny.num_blocks, tiny.inner_dim, tiny.context_in_dim) == (2, 64, 64)
    assert tiny.transformer_params == sum(p.numel() for p in model.transformer.parameters())
    assert tiny.text_encoder_params == sum(p.numel() for p in model.text_encoder.parameters())
