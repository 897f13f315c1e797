"""AWM's weighted flow-matching log-prob, its PPO-shaped loss and the stratified timesteps against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses.awm import (
    AWM_ADV_CLIP_MAX,
    AWM_GHUBER_EPS,
    AWM_GHUBER_POWER,
    awm_log_prob,
    awm_loss,
    awm_timestep_indices,
)
from align.losses.nft import linear_decay


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (4, 3, 2)
    x0, noise = torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)
    v = noise - x0 + 0.5 * torch.randn(*shape, generator=g, dtype=dtype)
    t = torch.tensor([0.95, 0.7, 0.4, 0.1], dtype=torch.float64)
    return v, noise, x0, t


def _hand_log_prob(v, noise, x0, t, p=0.25, eps=1e-10):
    out = []
    v, noise, x0 = (a.reshape(a.shape[0], -1).tolist() for a in (v, noise, x0))
    for i in range(len(v)):
        e = sum((v[i][k] - (noise[i][k] - x0[i][k])) ** 2 for k in range(len(v[i]))) / len(v[i])
        out.append(-(((e + eps) ** p - eps**p) * float(t[i]) / p))
    return out


def test_log_prob_matches_hand_computation():
    assert (AWM_GHUBER_POWER, AWM_GHUBER_EPS, AWM_ADV_CLIP_MAX) == (0.25, 1e-10, 5.0)
    v, noise, x0, t = _batch()
    lp = awm_log_prob(v, noise, x0, t)
    assert lp.dtype == torch.float64
    assert lp.tolist() == pytest.approx(_hand_log_prob(v, noise, x0, t), rel=1e-12)
    uniform = awm_log_prob(v, noise, x0, t, weighting="uniform")
    assert uniform.tolist() == pytest.approx([-((a - (b - c)) ** 2).mean().item() for a, b, c in zip(v, noise, x0)])
    # a perfect prediction has log-prob exactly 0 (the eps^p offset)
    assert awm_log_prob(noise - x0, noise, x0, t).abs().max().item() < 1e-12


@pytest.mark.parametrize("on_policy", [True, False])
def test_loss_matches_hand_computation(on_policy):
    v, noise, x0, t = _batch(1)
    v = v.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    v_ref = v.detach() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    v_ema = v.detach() + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    adv = torch.tensor([7.0, 2.0, -1.0, -6.0])
    lp = awm_log_prob(v, noise, x0, t)
    old = None if on_policy else lp.detach() + torch.tensor([0.3, -0.2, 0.01, -0.5], dtype=torch.float64)
    clip = 0.2
    loss, stats = awm_loss(lp, adv, old, v=v, v_ref=v_ref, v_ema=v_ema, clip_range=clip, kl_coef=0.003,
                           ema_kl_coef=1.0)
    lps = _hand_log_prob(v.detach(), noise, x0, t)
    olds = lps if on_policy else old.tolist()
    per = []
    for lp_i, old_i, a in zip(lps, olds, adv.tolist()):
        a = min(max(a, -5.0), 5.0) / 5.0 * 1.0
        r = math.exp(lp_i - old_i)
        per.append(max(-a * r, -a * min(max(r, 1 - clip), 1 + clip)))
    n = v[0].numel()
    kl = sum(((v.detach() - v_ref)[i] ** 2).sum().item() / n for i in range(4)) / 4
    ema_kl = sum(((v.detach() - v_ema)[i] ** 2).sum().item() / n for i in range(4)) / 4
    assert float(loss.detach()) == pytest.approx(sum(per) / 4 + 0.003 * kl + 1.0 * ema_kl, rel=1e-12)
    assert stats["kl"] == pytest.approx(kl, rel=1e-12) and stats["ema_kl"] == pytest.approx(ema_kl, rel=1e-12)
    if on_policy:
        assert stats["ratio_min"] == stats["ratio_max"] == 1.0 and stats["clip_fraction"] == 0.0
    else:
        # ratios e^-0.3, e^0.2, e^-0.01, e^0.5: three lie outside [0.8, 1.2] (grpo_clip_loss's clip_fraction)
        assert stats["clip_fraction"] == pytest.approx(0.75)
        assert stats["ratio_max"] == pytest.approx(math.exp(0.5), rel=1e-12)


def test_on_policy_gradient_is_the_advantage_weighted_fm_gradient():
    v, noise, x0, t = _batch(2)
    v = v.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -2.5, 10.0, 0.0])
    loss, _ = awm_loss(awm_log_prob(v, noise, x0, t), adv)
    (grad,) = torch.autograd.grad(loss, v)
    v2 = v.detach().clone().requires_grad_(True)
    lp = awm_log_prob(v2, noise, x0, t)
    a = adv.double().clamp(-5, 5) / 5
    (expected,) = torch.autograd.grad((-a * lp).mean(), v2)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    # and the log-prob's gradient is the generalised-Huber-weighted FM gradient, checked by finite differences
    assert torch.autograd.gradcheck(lambda x: awm_log_prob(x, noise, x0, t), (v2,))
    # nothing else gets a gradient
    noise_r, x0_r, t_r = (a.clone().requires_grad_(True) for a in (noise, x0, t))
    awm_loss(awm_log_prob(v, noise_r, x0_r, t_r), adv)[0].backward()
    assert noise_r.grad is None and x0_r.grad is None and t_r.grad is None


def test_ratio_is_exactly_one_before_an_update_in_bf16():
    v, noise, x0, t = (a.to(torch.bfloat16) if a.dim() > 1 else a for a in _batch(3))
    old = awm_log_prob(v.clone(), noise, x0, t)                     # scored at rollout / before the update
    lp = awm_log_prob(v.clone().requires_grad_(True), noise, x0, t)
    _, stats = awm_loss(lp, torch.tensor([1.0, -1.0, 0.5, 2.0]), old, clip_range=1e-4)
    assert stats["ratio_min"] == stats["ratio_max"] == 1.0 and stats["clip_fraction"] == 0.0


def test_stratified_timesteps():
    gen = torch.Generator().manual_seed(0)
    # 14 steps, fraction 0.9 -> trainable steps 1..11 in strata from floor(linspace(1, 12, 7)) = 1,2,4,6,8,10,12
    strata = [(1, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    seen = [set() for _ in strata]
    for _ in range(200):
        idx = awm_timestep_indices(14, 6, 0.9, generator=gen)
        assert idx.dtype == torch.long and idx.shape == (6,)
        for k, (lo, hi) in enumerate(strata):
            assert lo <= int(idx[k]) < hi
            seen[k].add(int(idx[k]))
    assert seen == [set(range(lo, hi)) for lo, hi in strata]
    a = awm_timestep_indices(14, generator=torch.Generator().manual_seed(7))
    b = awm_timestep_indices(14, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="trainable steps"):
        awm_timestep_indices(4, 6, 0.9)
    assert linear_decay(100, 0.001, 0.3) == pytest.approx(0.1) and linear_decay(1000, 0.001, 0.3) == 0.3


def test_kl_coefficient_needs_its_velocity():
    lp = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="v_ref"):
        awm_loss(lp, torch.zeros(2), kl_coef=0.1)
