"""The edit conditioning seam and the tiny edit models (Edit-2509 / Edit-2511 layouts) against diffusers."""

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline
from PIL import Image

from qwen_image import QwenImage, QwenImageInputError
from qwen_image.latents import img_shapes
from qwen_image.model import is_edit_checkpoint
from qwen_image.sampling import Conditioning, predict_velocity

PROMPT = 'replace "Latte" with "拿铁"'


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


# Non-square references with different aspect ratios (h x w): 40x72 -> 32x96 px on the VAE side, 64x48 -> 64x64.
REFS = [_image(40, 72, 0), _image(64, 48, 1)]


@pytest.fixture(scope="module")
def edit_models():
    return {v: QwenImage.tiny_edit(v) for v in ("2509", "2511")}


@pytest.fixture
def tiny_edit_sizes(monkeypatch, edit_models):
    """EditPlus reads its condition/reference areas from module constants (384², 1024² px): point them at the tiny
    model's (24², 64²) so the pipeline runs on what our encoder sees, in a fraction of a second."""
    model = edit_models["2509"]
    monkeypatch.setattr(edit_plus, "CONDITION_IMAGE_SIZE", model.edit_condition_area)
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", model.edit_reference_area)


@pytest.mark.parametrize("variant", ["2509", "2511"])
@pytest.mark.parametrize("n_refs", [1, 2])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_edit_sampler_equals_edit_plus_pipeline(edit_models, tiny_edit_sizes, variant, n_refs, cfg):
    model = edit_models[variant]
    assert model.edit_model and model.transformer.config.zero_cond_t == (variant == "2511")
    h, w = 48, 80  # non-square target
    latents = model.initial_noise(1, h, w, seed=3)
    negative = " " if cfg > 1 else None
    pipe = model.pipeline("edit")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(image=REFS[:n_refs], prompt=PROMPT, negative_prompt=negative, true_cfg_scale=cfg, height=h, width=w,
               num_inference_steps=3, latents=latents.clone(), output_type="latent").images
    ours = model.sample([PROMPT], h, w, num_inference_steps=3, true_cfg_scale=cfg, negative_prompt=negative,
                        latents=latents.clone(), images=REFS[:n_refs]).latents
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - latents).abs().max() > 1e-3


def test_references_and_zero_cond_t_change_the_velocity(edit_models):
    m9, m11 = edit_models["2509"], edit_models["2511"]
    x = m9.initial_noise(1, 48, 80, seed=0)
    shapes = img_shapes(1, 48, 80)
    cond = m9.conditioning([PROMPT], REFS)
    assert cond.references.shapes == [(1, 2, 6), (1, 4, 4)]  # 32x96 and 64x64 px
    v = predict_velocity(m9.transformer, x, 0.7, cond, shapes)
    assert v.shape == x.shape  # only the target tokens come back
    other = Conditioning(cond.embeds, cond.mask, m9.conditioning([PROMPT], [REFS[1], REFS[0]]).references)
    assert not torch.allclose(predict_velocity(m9.transformer, x, 0.7, other, shapes), v, atol=1e-4)
    # same weights, Edit-2511's t = 0 modulation of reference tokens
    assert all(torch.equal(a, b) for a, b in zip(m9.transformer.state_dict().values(), m11.transformer.state_dict().values()))
    assert not torch.allclose(predict_velocity(m11.transformer, x, 0.7, cond, shapes), v, atol=1e-4)
    # without references the seam is the text-to-image call
    t2i = Conditioning(cond.embeds, cond.mask)
    direct = m9.transformer(hidden_states=x, timestep=torch.tensor([0.7]), encoder_hidden_states=cond.embeds,
                            encoder_hidden_states_mask=cond.mask, img_shapes=shapes, return_dict=False)[0]
    torch.testing.assert_close(predict_velocity(m9.transformer, x, 0.7, t2i, shapes), direct, atol=1e-6, rtol=0)


def test_batched_rows_with_their_own_references_equal_one_at_a_time(edit_models):
    model = edit_models["2511"]
    rows = [[_image(40, 72, 5)], [_image(36, 70, 6)]]  # different pixels, same reference size (32x96)
    prompts = [PROMPT, "make the cup red and the saucer blue"]
    x = model.initial_noise(2, 48, 80, seed=1)
    cond = model.conditioning(prompts, rows)
    assert cond.mask is not None  # unequal prompt lengths: padded and masked
    v = predict_velocity(model.transformer, x, torch.tensor([0.9, 0.3]), cond, img_shapes(2, 48, 80))
    for i in range(2):
        single = model.conditioning([prompts[i]], [rows[i]])
        vi = predict_velocity(model.transformer, x[i : i + 1], torch.tensor([0.9, 0.3][i]), single, img_shapes(1, 48, 80))
        torch.testing.assert_close(v[i : i + 1], vi, atol=1e-5, rtol=0)
    torch.testing.assert_close(cond.select([1]).references.latents, model.conditioning([prompts[1]], [rows[1]]).references.latents)
    # GRPO groups: every row repeated with its own references
    group = cond.repeat_interleave(2)
    assert torch.equal(group.references.latents[2], cond.references.latents[1]) and group.embeds.shape[0] == 4


def test_sde_sampler_with_references_records_log_probs(edit_models):
    model = edit_models["2511"]
    out = model.sample([PROMPT], 48, 80, num_inference_steps=3, images=REFS[:1], noise_level=0.7, sde_window=(0, 2),
                       record=True, seed=0)
    assert out.sde_steps == [0, 1] and torch.isfinite(out.log_probs).all() and out.log_probs[:, 2].eq(0).all()
    assert out.latents.shape == model.initial_noise(1, 48, 80).shape


def test_text_cache_key_includes_the_images(edit_models):
    model = edit_models["2509"]
    enc = model.edit_encoder
    enc.clear_cache()
    a, _ = enc.encode_prompts([PROMPT], [REFS[0]])
    b, _ = enc.encode_prompts([PROMPT], [_image(40, 72, 9)])
    assert a.shape == b.shape and not torch.allclose(a, b)  # the vision tokens read the pixels
    t2i, _ = model.encode_prompt([PROMPT])
    # edit template (64 tokens dropped) + "Picture 1:" and the vision tokens: longer than the T2I embedding
    assert a.shape[1] > t2i.shape[1]
    calls = []
    handle = model.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        again, _ = enc.encode_prompts([PROMPT], [REFS[0].copy()])
    finally:
        handle.remove()
    assert calls == [] and torch.equal(again, a)


def test_edit_default_size_and_bad_inputs(edit_models):
    model = edit_models["2509"]
    out = model.edit(REFS[0], PROMPT, num_inference_steps=2)
    assert out.size == (96, 32)  # the last reference's aspect ratio at the model's default area
    too_many = [REFS[0]] * 4
    cases = [
        (lambda: model.edit(too_many, PROMPT), "1 to 3"),
        (lambda: model.edit([], PROMPT), "1 to 3"),
        (lambda: model.conditioning(["a", "b"], [[REFS[0]]]), "1 rows but 2 prompts"),
        (lambda: model.conditioning(["a", "b"], [[REFS[0]], [REFS[0], REFS[1]]]), "same number"),
        (lambda: model.conditioning(["a", "b"], [[REFS[0]], [REFS[1]]]), "reference sizes differ"),
        (lambda: model.conditioning(["a"], ["cat.png"]), "PIL image"),
    ]
    for fn, text in cases:
        with pytest.raises(QwenImageInputError, match=text) as info:
            fn()
        assert "\n" not in str(info.value)


def test_edit_checkpoint_round_trip(edit_models, tmp_path, tiny_checkpoint):
    model = edit_models["2511"]
    model.save_pretrained(tmp_path)
    assert is_edit_checkpoint(tmp_path) and not is_edit_checkpoint(tiny_checkpoint)  # T2I has processor/ too
    loaded = QwenImage.from_pretrained(tmp_path, torch_dtype="float32")
    assert loaded.edit_model and loaded.transformer.config.zero_cond_t
    # diffusers loads it too (with our offline processor: the default one needs torchvision)
    pipe = QwenImageEditPlusPipeline.from_pretrained(tmp_path, processor=loaded.processor)
    assert pipe.transformer.config.zero_cond_t
    lat = model.initial_noise(1, 48, 80, seed=0)
    x1 = model.sample([PROMPT], 48, 80, num_inference_steps=2, latents=lat.clone(), images=REFS).latents
    x2 = loaded.sample([PROMPT], 48, 80, num_inference_steps=2, latents=lat.clone(), images=REFS).latents
    torch.testing.assert_close(x1, x2, atol=1e-5, rtol=0)
