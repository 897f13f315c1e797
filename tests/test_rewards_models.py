"""CLIP-family rewards on a tiny random CLIP built in the test (offline, local_files_only)."""

import math

import pytest
import torch
from PIL import Image

import rewards
from rewards.models import load_clip, load_linear_head
from rewards.testing import make_tiny_aesthetic_head, make_tiny_clip

PROMPTS = ["a red square", "a blue square", "你好 white", "green"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=0)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "white")] + [
        Image.effect_noise((48, 48), 40).convert("RGB")
    ]


def test_clip_score_finite_in_range_deterministic(clip_dir, tmp_path, images):
    r = rewards.get_reward("clip_score", model_path=str(clip_dir), batch_size=3)
    a, b = r(PROMPTS, images), r(PROMPTS, images)
    assert len(a) == 4 and all(math.isfinite(x) and -1.0 <= x <= 1.0 for x in a)
    assert a == b
    assert len(set(round(x, 6) for x in a)) > 1  # not a constant
    # the same seed saved elsewhere (fresh load, no cache) gives the same numbers; batching does not matter
    other = make_tiny_clip(tmp_path / "again", seed=0)
    c = rewards.get_reward("clip_score", model_path=other, batch_size=1)(PROMPTS, images)
    assert c == pytest.approx(a, abs=1e-5)
    d = make_tiny_clip(tmp_path / "seed1", seed=1)
    assert rewards.get_reward("clip_score", model_path=d)(PROMPTS, images) != pytest.approx(a, abs=1e-3)


def test_clip_score_matches_manual_cosine(clip_dir, images):
    model, proc = load_clip(clip_dir)
    inp = proc(text=PROMPTS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inp)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    got = rewards.get_reward("clip_score", model_path=clip_dir, scale=2.5, clamp_min=0.0)(PROMPTS, images)
    assert got == pytest.approx([2.5 * max(float(c), 0.0) for c in cos], abs=1e-5)
    # pickscore = exp(logit_scale) * cos / 26; hpsv2 = cos
    scale = float(model.logit_scale.exp())
    ps = rewards.get_reward("pickscore", model_path=clip_dir, processor_path=clip_dir)(PROMPTS, images)
    assert ps == pytest.approx([scale * float(c) / 26 for c in cos], abs=1e-5)
    hp = rewards.get_reward("hpsv2", model_path=clip_dir)(PROMPTS, images)
    assert hp == pytest.approx([float(c) for c in cos], abs=1e-5)


def test_aesthetic_head_on_image_embeds(clip_dir, tmp_path, images):
    head = make_tiny_aesthetic_head(tmp_path / "head.pth", in_dim=16, hidden=(8, 4))
    r = rewards.get_reward("aesthetic", model_path=clip_dir, head_path=head)
    got = r(PROMPTS, images)
    assert all(math.isfinite(x) for x in got) and len(set(got)) > 1
    assert r(["other prompts"] * 4, images) == got  # prompt is ignored
    model, proc = load_clip(clip_dir)
    with torch.no_grad():
        emb = model(**proc(text=PROMPTS, images=images, return_tensors="pt", padding=True)).image_embeds
        want = load_linear_head(head)(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    # safetensors head with > 10 layers loads in natural key order (layers.10 after layers.8)
    deep = make_tiny_aesthetic_head(tmp_path / "deep.safetensors", in_dim=16, hidden=(8,) * 6)
    mlp = load_linear_head(deep)
    assert [m.in_features for m in mlp] == [16] + [8] * 6


def test_missing_path_and_bad_inputs(clip_dir, tmp_path, images):
    missing = tmp_path / "nope"
    for name in ("clip_score", "pickscore", "hpsv2"):
        with pytest.raises(FileNotFoundError) as e:
            rewards.get_reward(name, model_path=missing)
        msg = str(e.value)
        assert str(missing) in msg and "\n" not in msg
    with pytest.raises(ValueError):
        rewards.get_reward("clip_score")
    with pytest.raises(ValueError):
        rewards.get_reward("aesthetic", model_path=clip_dir)  # no head
    with pytest.raises(ValueError):
        rewards.get_reward("clip_score", model_path=clip_dir)(PROMPTS[:2], images)
    bad = tmp_path / "bad.pth"
    torch.save({"a.weight": torch.zeros(4, 16), "b.weight": torch.zeros(1, 5)}, bad)
    with pytest.raises(ValueError):
        load_linear_head(bad)
