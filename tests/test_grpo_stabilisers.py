"""GRPO-Guard's normalised ratio and Flow-DPPO's KL trust region against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses.grpo import dppo_loss, grpo_clip_loss, grpo_guard_loss, trust_region_kl


def test_guard_matches_hand_computation():
    # sigma_t 0.5, dt -0.04 -> step std s = 0.5 * 0.2 = 0.1
    mean = torch.tensor([[0.1, 0.0], [0.0, 0.0]], requires_grad=True)
    old_mean = torch.zeros(2, 2)
    lp = torch.tensor([-0.2, 0.3], requires_grad=True)
    old = torch.zeros(2)
    adv = torch.tensor([1.0, -1.0])
    loss, m = grpo_guard_loss(lp, old, adv, 0.01, mean, old_mean, 0.5, -0.04)
    s = 0.1
    b0 = (0.1**2 / 2) / (2 * s**2)                       # mean over the 2 elements / (2 s^2) = 0.25
    r0, r1 = math.exp((-0.2 + b0) * s), math.exp(0.3 * s)
    per0 = max(-1 * r0, -1 * min(max(r0, 0.99), 1.01))
    per1 = max(1 * r1, 1 * min(max(r1, 0.99), 1.01))
    expected = (per0 + per1) / 2 / 0.04                  # 1/|dt| reweighting
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert m["ratio_bias_mean"] == pytest.approx(b0 / 2, rel=1e-6)
    assert m["ratio_max"] == pytest.approx(r1, rel=1e-6) and m["clip_fraction"] == pytest.approx(0.5)
    loss.backward()
    # sample 1: A < 0 and r_hat > 1 + eps -> the unclipped branch, d/dlp = -A * s * r / B / |dt|
    assert float(lp.grad[1]) == pytest.approx(1 * s * r1 / 2 / 0.04, rel=1e-5)
    # the bias carries the gradient of the current mean: d/dmean00 = -A * r0 * s * (2 * 0.1 / 2) / (2 s^2) / B / |dt|
    assert float(mean.grad[0, 0]) == pytest.approx(-1 * r0 * s * 0.1 / (2 * s**2) / 2 / 0.04, rel=1e-5)
    unweighted, _ = grpo_guard_loss(lp.detach(), old, adv, 0.01, mean.detach(), old_mean, 0.5, -0.04, reweight=False)
    assert float(unweighted) == pytest.approx(expected * 0.04, rel=1e-6)


def test_guard_clip_stops_the_gradient_of_an_overconfident_positive_sample():
    lp = torch.tensor([5.0, 0.0], requires_grad=True)   # r_hat = exp(0.5) for sample 0: far past 1 + eps
    mean = torch.zeros(2, 3)
    loss, _ = grpo_guard_loss(lp, torch.zeros(2), torch.tensor([1.0, 1.0]), 0.01, mean, mean, 0.5, -0.04)
    loss.backward()
    assert float(lp.grad[0]) == 0.0 and float(lp.grad[1]) != 0.0


def test_guard_centres_the_left_shifted_ratio():
    # Transitions drawn from the old step Gaussian, scored by a moved policy: the raw log-ratio has mean -b
    # (left shift); after RatioNorm the ratio is 1 up to the tiny noise term.
    gen = torch.Generator().manual_seed(0)
    s, n = 0.1, 4096
    old_mean = torch.zeros(8, n)
    mean = old_mean + 0.02 * torch.randn(8, n, generator=gen)
    x = old_mean + s * torch.randn(8, n, generator=gen)
    lp = (-(x - mean) ** 2 / (2 * s**2)).mean(1)
    lp_old = (-(x - old_mean) ** 2 / (2 * s**2)).mean(1)
    raw = torch.exp(lp - lp_old)
    _, m = grpo_guard_loss(lp, lp_old, torch.ones(8), 1e-3, mean, old_mean, 0.5, -0.04)
    assert float(raw.mean()) < 0.99                              # the raw ratio sits below 1
    assert abs(m["ratio_mean"] - 1.0) < 1e-3 and abs(m["ratio_min"] - 1.0) < 1e-3


def test_dppo_matches_hand_computation():
    d = torch.tensor([0.01, 0.0])
    mean = torch.stack([torch.zeros(2), d, d, d])
    old_mean = torch.zeros(4, 2)
    lp = torch.tensor([0.1, 0.1, -0.1, -0.1], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, m = dppo_loss(lp, torch.zeros(4), adv, 1e-5, mean, old_mean, 0.5, -0.04)
    # the paper's D_t: mean over elements / (2 (sigma_t sqrt|dt|)^2) = (1e-4 / 2) / (2 * 0.25 * 0.04) = 2.5e-3 > 1e-5
    kl = (0.01**2 / 2) / (2 * (0.5 * math.sqrt(0.04)) ** 2)
    assert m["trust_kl_max"] == pytest.approx(kl, rel=1e-5) and m["trust_kl_mean"] == pytest.approx(0.75 * kl, rel=1e-5)
    # 0: inside the region (kept); 1: A>0, r>1, outside (masked); 2: A>0, r<1 (moving back, kept); 3: A<0, r<1 (masked)
    expected = (-math.exp(0.1) + 0.0 - math.exp(-0.1) + 0.0) / 4
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert m["clip_fraction"] == pytest.approx(0.5)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-math.exp(0.1) / 4, 0.0, -math.exp(-0.1) / 4, 0.0], rel=1e-5)
    _, m_old = dppo_loss(lp.detach(), torch.zeros(4), adv, 1e-5, mean, old_mean, 0.5, -0.04,
                         trust_region_form="flow_grpo")
    assert m_old["trust_kl_max"] == pytest.approx((0.01**2 / 2) / (2 * 0.25), rel=1e-5)   # no 1/|dt|: |dt| x smaller
    _, m_exact = dppo_loss(lp.detach(), torch.zeros(4), adv, 1e-5, mean, old_mean, 0.5, -0.04,
                           trust_region_form="exact")
    assert m_exact["trust_kl_max"] == pytest.approx(0.01**2 / (2 * 0.25 * 0.04), rel=1e-5)  # sum / (2 sigma_t^2 |dt|)


def test_dppo_paper_trust_region_is_stricter_than_the_flow_grpo_form():
    # One move whose per-element D is between the two forms' values for eps_D = 1e-5: the flow_grpo form keeps the
    # update, the paper's form (|dt| = 0.04 -> 25x larger) masks it.
    std_t, dt = 0.7, -0.04
    delta = 0.002
    mean = torch.full((1, 8), delta)
    old_mean = torch.zeros(1, 8)
    paper = delta**2 / (2 * (std_t * math.sqrt(abs(dt))) ** 2)
    flow_grpo = delta**2 / (2 * std_t**2)
    assert flow_grpo < 1e-5 < paper
    lp = torch.tensor([0.01])
    adv = torch.tensor([1.0])
    _, m_paper = dppo_loss(lp, torch.zeros(1), adv, 1e-5, mean, old_mean, std_t, dt)
    _, m_fg = dppo_loss(lp, torch.zeros(1), adv, 1e-5, mean, old_mean, std_t, dt, trust_region_form="flow_grpo")
    assert m_paper["trust_kl_max"] == pytest.approx(paper, rel=1e-5) and m_paper["clip_fraction"] == 1.0
    assert m_fg["trust_kl_max"] == pytest.approx(flow_grpo, rel=1e-5) and m_fg["clip_fraction"] == 0.0
    # the reference KL's kl_form (what older callers pass) no longer changes the trust region
    _, m_legacy = dppo_loss(lp, torch.zeros(1), adv, 1e-5, mean, old_mean, std_t, dt, kl_form="flow_grpo")
    assert m_legacy == m_paper
    with pytest.raises(ValueError, match="trust_region_form"):
        dppo_loss(lp, torch.zeros(1), adv, 1e-5, mean, old_mean, std_t, dt, trust_region_form="k3")
    with pytest.raises(ValueError, match="kl_form"):
        dppo_loss(lp, torch.zeros(1), adv, 1e-5, mean, old_mean, std_t, dt, kl_form="k3")


def test_dppo_masks_at_the_threshold_as_verl_omni_does():
    mean = torch.full((1, 4), 0.01)
    old_mean = torch.zeros(1, 4)
    d = float(trust_region_kl(mean, old_mean, 0.5, -0.04))
    lp = torch.tensor([0.2])
    _, at = dppo_loss(lp, torch.zeros(1), torch.tensor([1.0]), d, mean, old_mean, 0.5, -0.04)
    _, above = dppo_loss(lp, torch.zeros(1), torch.tensor([1.0]), d * 1.01, mean, old_mean, 0.5, -0.04)
    assert at["clip_fraction"] == 1.0 and above["clip_fraction"] == 0.0


def test_on_policy_all_three_give_the_same_loss():
    lp = torch.tensor([-1.3, 0.4, 2.0])
    adv = torch.tensor([0.5, -1.0, 2.0])
    mean = torch.randn(3, 4)
    clip, mc = grpo_clip_loss(lp, lp, adv, 1e-4)
    guard, mg = grpo_guard_loss(lp, lp, adv, 1e-4, mean, mean, 0.7, -0.1, reweight=False)
    dppo, md = dppo_loss(lp, lp, adv, 1e-5, mean, mean, 0.7, -0.1)
    assert float(clip) == pytest.approx(float(-adv.mean())) == pytest.approx(float(guard)) == pytest.approx(float(dppo))
    assert set(mc) <= set(mg) and set(mc) <= set(md)
    assert mg["clip_fraction"] == md["clip_fraction"] == 0.0


def test_zero_dt_is_refused():
    z = torch.zeros(2)
    with pytest.raises(ValueError):
        grpo_guard_loss(z, z, z, 1e-4, torch.zeros(2, 2), torch.zeros(2, 2), 0.5, 0.0)


@pytest.mark.parametrize("policy_loss,extra_metric", [("guard", "ratio_bias_mean"), ("dppo", "trust_kl/mean")])
def test_trainer_with_stabiliser(policy_loss, extra_metric, tmp_path):
    """The GRPO trainer with a stabilised loss: on-policy the normalised ratio is exactly 1, nothing is masked or
    clipped on the first pass, and the run trains and saves."""
    import json
    from pathlib import Path

    from align.grpo import main

    root = Path(__file__).resolve().parents[1]
    main(["--config", str(root / "recipes/tiny/grpo_brightness.yaml"), "--output_dir", str(tmp_path),
          "--policy_loss", policy_loss, "--epsilon", "1e-5" if policy_loss == "dppo" else "1e-4", "--max_steps", "2",
          "--disable_tqdm", "true"])
    history = [h for h in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] if "ratio/mean" in h]
    first = history[0]
    assert first["ratio/min"] == 1.0 and first["ratio/max"] == 1.0 and first["clip_fraction"] == 0.0, first
    assert extra_metric in first
    assert (tmp_path / "transformer" / "config.json").is_file()
