"""Rollouts: log-probs recomputed at training equal those stored at rollout (same weights), so the ratio is exactly 1
before any update; an update moves it."""

import pytest
import torch
from lora_helpers import perturbed_lora

from align.losses import grpo_clip_loss
from align.losses.grpo import sde_window_for
from align.rl.rollouts import generate_rollouts, recompute_log_prob


@pytest.fixture(scope="module")
def lora_model():
    """A tiny model with a LoRA whose lora_B is perturbed (gaussian init leaves adapters-on == off)."""
    from qwen_image import QwenImage

    return perturbed_lora(QwenImage.tiny(seed=0))


@pytest.mark.parametrize("cfg,window", [(1.0, None), (3.0, (1, 3))])
def test_recomputed_log_prob_equals_stored_and_ratio_is_one(lora_model, cfg, window):
    q = lora_model
    prompts = ["a red cat", "a red cat", "a sign that says \"HI\""]
    batch = generate_rollouts(q, q.transformer, prompts, {"text": ["", "", "HI"]}, height=32, width=32,
                              num_inference_steps=4, noise_level=0.7, sde_window=window, true_cfg_scale=cfg,
                              seeds=[0, 1, 2], generator=torch.Generator().manual_seed(0))
    assert batch.trajectory.shape == (3, 5, 4, 64)
    assert batch.sde_steps == ([0, 1, 2, 3] if window is None else [1, 2])
    assert batch.negative is not None if cfg > 1 else batch.negative is None
    assert len(batch.images) == 3 and batch.columns["text"][2] == "HI"
    for j in batch.sde_steps:
        step = recompute_log_prob(q.transformer, batch, j)
        assert torch.equal(step.log_prob, batch.log_probs[:, j])
        _, m = grpo_clip_loss(step.log_prob, batch.log_probs[:, j], torch.tensor([1.0, -1.0, 0.5]), 1e-4)
        assert m["ratio_mean"] == m["ratio_min"] == m["ratio_max"] == 1.0 and m["clip_fraction"] == 0.0
    ode_steps = [j for j in range(4) if j not in batch.sde_steps]
    if ode_steps:
        with pytest.raises(ValueError, match="ODE step"):
            recompute_log_prob(q.transformer, batch, ode_steps[0])


def test_ratio_moves_after_an_update(lora_model):
    q = lora_model
    batch = generate_rollouts(q, q.transformer, ["a red cat"] * 2, height=32, width=32, num_inference_steps=3,
                              seeds=[5, 6], generator=torch.Generator().manual_seed(3))
    lora = [p for n, p in q.transformer.named_parameters() if "lora_" in n]
    saved = [p.detach().clone() for p in lora]
    for p in lora:
        p.requires_grad_(True)
    step = recompute_log_prob(q.transformer, batch, 0)
    loss, _ = grpo_clip_loss(step.log_prob, batch.log_probs[:, 0], torch.tensor([1.0, -1.0]), 1e-4)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    with torch.no_grad():
        for p in lora:
            if p.grad is not None:
                p -= 0.5 * p.grad.sign() * 1e-2
    try:
        with torch.no_grad():
            after = recompute_log_prob(q.transformer, batch, 0).log_prob
        assert not torch.equal(after, batch.log_probs[:, 0])
        # a descent step on -A*ratio raises the log-prob of the positive-advantage sample relative to the other
        assert (after - batch.log_probs[:, 0])[0] > (after - batch.log_probs[:, 0])[1]
    finally:
        with torch.no_grad():
            for p, s in zip(lora, saved):
                p.copy_(s)
                p.grad = None


def test_sde_window():
    assert sde_window_for(10, 0) is None
    g = torch.Generator().manual_seed(0)
    starts = {sde_window_for(10, 2, None, g)[0] for _ in range(50)}
    assert starts <= set(range(5)) and len(starts) > 1
    assert sde_window_for(10, 2, [3, 4]) == (3, 5)
    with pytest.raises(ValueError, match="exceeds"):
        sde_window_for(4, 5)
    with pytest.raises(ValueError, match="leaves no start"):
        sde_window_for(10, 3, [9, 10])


def test_noise_level_zero_is_rejected(lora_model):
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        generate_rollouts(lora_model, lora_model.transformer, ["x"], height=32, width=32, noise_level=0.0,
                          seeds=[0], generator=torch.Generator())
