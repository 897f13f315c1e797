import math

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from PIL import Image

from qwen_image import QwenImage, QwenImageInputError, pack, unpack
from qwen_image.latents import img_shapes
from qwen_image.sampling import sample, sde_step
from qwen_image.scheduler import inference_sigmas
from qwen_image.text import EDIT_DROP_TOKENS, EDIT_SYSTEM, T2I_DROP_TOKENS, T2I_TEMPLATE

PROMPTS = ['a red sign that says "新品上市"', "a cat"]


def test_template_token_counts(tiny_model):
    tok = tiny_model.tokenizer
    prefix = T2I_TEMPLATE.split("{}")[0]
    assert len(tok(prefix).input_ids) == T2I_DROP_TOKENS == 34
    edit_prefix = "<|im_start|>system\n" + EDIT_SYSTEM + "<|im_end|>\n<|im_start|>user\n"
    assert len(tok(edit_prefix).input_ids) == EDIT_DROP_TOKENS == 64
    # kept tokens = prompt tokens + 5 suffix tokens
    assert tiny_model.prompt_encoder.count_tokens("hello world") == len(tok("hello world").input_ids) + 5


def test_prompt_encoding_matches_pipeline_and_caches(tiny_model):
    pipe = tiny_model.pipeline()
    ref, ref_mask = pipe.encode_prompt(PROMPTS, device="cpu")
    tiny_model.prompt_encoder.clear_cache()
    emb, mask = tiny_model.encode_prompt(PROMPTS)
    assert emb.shape == ref.shape and torch.equal(mask, ref_mask.long())
    torch.testing.assert_close(emb, ref, atol=1e-6, rtol=0)
    # prompts of unequal length: the short one is zero-padded and masked
    assert mask[1].sum() < mask[0].sum() and emb[1, mask[1].sum():].abs().sum() == 0
    calls = []
    handle = tiny_model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        again, _ = tiny_model.encode_prompt(list(reversed(PROMPTS)))
    finally:
        handle.remove()
    assert calls == []  # served from the cache
    torch.testing.assert_close(again[0, : int(mask[1].sum())], emb[1, : int(mask[1].sum())])


def test_prompt_too_long_is_a_clear_error(tiny_model):
    with pytest.raises(QwenImageInputError, match="at most 1024"):
        tiny_model.encode_prompt(["word " * 1100])


def test_pack_unpack_round_trip():
    lat = torch.randn(2, 16, 1, 8, 12)
    tokens = pack(lat)
    assert tokens.shape == (2, 4 * 6, 64)
    torch.testing.assert_close(unpack(tokens, 64, 96), lat, atol=0, rtol=0)
    # 1024^2 px -> 4096 tokens
    assert pack(torch.zeros(1, 16, 1, 128, 128)).shape[1] == 4096


def test_scheduler_sigmas_real_config(tiny_model):
    sig = inference_sigmas(tiny_model.scheduler, 3, 16)
    assert sig[0] == pytest.approx(1.0) and sig[-2] == pytest.approx(0.02, abs=1e-6) and sig[-1] == 0
    # larger images are shifted towards noise (mu grows with sequence length)
    assert inference_sigmas(tiny_model.scheduler, 3, 4096)[1] > inference_sigmas(tiny_model.scheduler, 3, 256)[1]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_ode_sampler_equals_diffusers_pipeline(tiny_model, cfg):
    h = w = 64
    latents = tiny_model.initial_noise(2, h, w, seed=3)
    pipe = tiny_model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPTS, negative_prompt=" " if cfg > 1 else None, true_cfg_scale=cfg, height=h, width=w,
               num_inference_steps=4, latents=latents.clone(), output_type="latent").images
    ours = tiny_model.sample(PROMPTS, h, w, num_inference_steps=4, true_cfg_scale=cfg,
                             negative_prompt=" " if cfg > 1 else None, latents=latents.clone()).latents
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - latents).abs().max() > 1e-3  # it really denoised


def test_sde_at_noise_zero_equals_ode(tiny_model):
    lat = tiny_model.initial_noise(2, 64, 64, seed=1)
    ode = tiny_model.sample(PROMPTS, 64, 64, num_inference_steps=3, latents=lat.clone()).latents
    cond = tiny_model.conditioning(PROMPTS)
    sigmas = inference_sigmas(tiny_model.scheduler, 3, 16)
    neg = tiny_model.conditioning([" "] * 2)
    sde = sample(tiny_model.transformer, lat.clone(), sigmas, cond, img_shapes(2, 64, 64), negative=neg,
                 true_cfg_scale=4.0, noise_level=1e-12).latents
    torch.testing.assert_close(sde, ode, atol=1e-5, rtol=0)
    noisy = tiny_model.sample(PROMPTS, 64, 64, num_inference_steps=3, latents=lat.clone(), noise_level=0.7).latents
    assert (noisy - ode).abs().max() > 1e-2


def test_sde_log_prob_equals_closed_form_gaussian():
    torch.manual_seed(0)
    x, v = torch.randn(3, 16, 64), torch.randn(3, 16, 64)
    s, s_next, a, s_max = 0.7, 0.45, 0.8, 0.9
    step = sde_step(x, v, s, s_next, a, s_max, generator=torch.Generator().manual_seed(1))
    dt = s_next - s
    std_t = a * math.sqrt(s / (1 - s))
    mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
    scale = std_t * math.sqrt(-dt)
    expected = torch.distributions.Normal(mean, scale).log_prob(step.prev_sample).mean(dim=(1, 2))
    torch.testing.assert_close(step.log_prob, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.mean, mean)
    # scoring a given transition reproduces the stored log-prob exactly
    again = sde_step(x, v, s, s_next, a, s_max, prev_sample=step.prev_sample)
    assert torch.equal(again.log_prob, step.log_prob)
    # at sigma = 1 the std uses sigma_max in the denominator (no division by zero)
    first = sde_step(x, v, 1.0, 0.9, a, s_max)
    assert torch.isfinite(first.log_prob).all()


def test_sde_sampler_records_log_probs_in_window(tiny_model):
    out = tiny_model.sample(PROMPTS[:1], 64, 64, num_inference_steps=4, noise_level=0.7, sde_window=(1, 3), record=True)
    assert out.sde_steps == [1, 2]
    assert len(out.trajectory) == 5 and out.log_probs.shape == (1, 4)
    assert (out.log_probs[:, [0, 3]] == 0).all() and (out.log_probs[:, 1:3] != 0).all()


def test_generate_returns_images(tiny_model):
    images = tiny_model.generate(['a red sign that says "新品上市"'], height=64, width=64, num_inference_steps=2,
                                 num_images_per_prompt=2)
    assert len(images) == 2 and images[0].size == (64, 64)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # different seeds


def test_checkpoint_round_trip(tiny_model, tiny_checkpoint):
    loaded = QwenImage.from_pretrained(tiny_checkpoint, torch_dtype="float32")
    for a, b in zip(tiny_model.transformer.state_dict().values(), loaded.transformer.state_dict().values()):
        assert torch.equal(a, b)
    lat = tiny_model.initial_noise(1, 64, 64, seed=0)
    x1 = tiny_model.sample(["a cat"], 64, 64, num_inference_steps=2, latents=lat.clone()).latents
    x2 = loaded.sample(["a cat"], 64, 64, num_inference_steps=2, latents=lat.clone()).latents
    torch.testing.assert_close(x1, x2, atol=1e-5, rtol=0)
    pipe = QwenImagePipeline.from_pretrained(tiny_checkpoint)  # any diffusers tool loads it
    pipe.set_progress_bar_config(disable=True)
    x3 = pipe(prompt=["a cat"], negative_prompt=" ", height=64, width=64, num_inference_steps=2, latents=lat.clone(),
              output_type="latent").images
    torch.testing.assert_close(x1, x3, atol=1e-5, rtol=0)


def test_edit_and_inpaint_run(tiny_model):
    ref = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    edited = tiny_model.edit([ref, ref], "make the sign blue", num_inference_steps=2, height=64, width=64)
    assert edited.size == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = tiny_model.inpaint(ref, mask, "a blue square", num_inference_steps=2)
    assert out.size == (64, 64)


def test_bad_inputs_give_one_line_errors(tiny_model, tmp_path):
    cases = [
        (lambda: tiny_model.generate(["x"], height=60, width=64), "multiple of 16"),
        (lambda: tiny_model.generate([], height=64, width=64), "empty"),
        (lambda: QwenImage.from_pretrained(tmp_path / "nope"), "does not exist"),
        (lambda: QwenImage.from_pretrained(tmp_path), "missing"),
        (lambda: QwenImage.tiny(dtype="float33"), "unknown dtype"),
        (lambda: tiny_model.edit([], "x"), "1 to 3"),
    ]
    for fn, text in cases:
        with pytest.raises(QwenImageInputError, match=text) as info:
            fn()
        assert "\n" not in str(info.value)


def test_precomputed_prompts_encode_after_the_text_encoder_is_released():
    model = QwenImage.tiny(seed=0)
    expected, _ = model.encode_prompt(PROMPTS)
    model.prompt_encoder.clear_cache()
    assert model.prompt_encoder.precompute([*PROMPTS, PROMPTS[0]]) == 2
    model.text_encoder = model.prompt_encoder.text_encoder = None
    again, mask = model.encode_prompt(list(reversed(PROMPTS)))
    torch.testing.assert_close(again[1], expected[0], atol=1e-6, rtol=0)
    with pytest.raises(QwenImageInputError, match="not encoded before the text encoder was released"):
        model.encode_prompt(["a prompt nobody precomputed"])
