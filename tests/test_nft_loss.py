"""DiffusionNFT loss, optimality mapping, old-policy schedules and EMA update against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align.losses.nft import (
    NFT_ADV_CLIP_MAX,
    NFT_KL_COEF,
    NFT_MIX_BETA,
    NFT_MIX_BETA_OCR,
    delayed_linear_decay,
    ema_update_,
    linear_decay,
    nft_implicit_velocities,
    nft_loss,
    nft_optimality,
)


def _batch(seed=0, shape=(3, 4, 2)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    eps = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
    v_old = eps - x0 + 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64)
    v = v_old + 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)
    v_ref = v_old + 0.2 * torch.randn(*shape, generator=g, dtype=torch.float64)
    adv = torch.tensor([7.0, -1.5, 0.5], dtype=torch.float64)    # 7 is past the +-5 clip
    return v, v_old, v_ref, x_t, x0, t, adv


def _hand(v, v_old, v_ref, x_t, x0, t, adv, beta, m, kl_coef):
    # The paper's / official code's definition, one sample and one element at a time with numpy scalars.
    v, v_old, v_ref, x_t, x0 = (a.numpy().reshape(a.shape[0], -1) for a in (v, v_old, v_ref, x_t, x0))
    t, adv = t.tolist(), adv.tolist()
    per_sample, kls = [], []
    for i in range(v.shape[0]):
        n = v.shape[1]
        pos, neg = [], []
        for k in range(n):
            vp = beta * v[i, k] + (1 - beta) * v_old[i, k]
            vn = (1 + beta) * v_old[i, k] - beta * v[i, k]
            pos.append(x_t[i, k] - t[i] * vp - x0[i, k])
            neg.append(x_t[i, k] - t[i] * vn - x0[i, k])
        w_pos = max(sum(abs(d) for d in pos) / n, 1e-5)
        w_neg = max(sum(abs(d) for d in neg) / n, 1e-5)
        l_pos = sum(d * d / w_pos for d in pos) / n
        l_neg = sum(d * d / w_neg for d in neg) / n
        a = min(max(adv[i], -m), m)
        r = min(max(a / m / 2 + 0.5, 0.0), 1.0)
        per_sample.append((r * l_pos / beta + (1 - r) * l_neg / beta) * m)
        kls.append(sum((v[i, k] - v_ref[i, k]) ** 2 for k in range(n)) / n)
    policy = sum(per_sample) / len(per_sample)
    kl = sum(kls) / len(kls)
    return policy + kl_coef * kl, policy, kl


def test_published_defaults():
    assert (NFT_MIX_BETA, NFT_MIX_BETA_OCR, NFT_ADV_CLIP_MAX, NFT_KL_COEF) == (1.0, 0.1, 5.0, 1e-4)
    assert linear_decay(0) == 0.0 and linear_decay(100) == pytest.approx(0.1) and linear_decay(10_000) == 0.5
    assert delayed_linear_decay(74) == 0.0 and delayed_linear_decay(75) == 0.0
    assert delayed_linear_decay(175) == pytest.approx(0.75) and delayed_linear_decay(10_000) == 0.999


@pytest.mark.parametrize("beta", [NFT_MIX_BETA, NFT_MIX_BETA_OCR])
def test_loss_matches_hand_computation(beta):
    v, v_old, v_ref, x_t, x0, t, adv = _batch()
    loss, stats = nft_loss(v, v_old, v_ref, x_t, x0, t, adv, beta=beta)
    expected, policy, kl = _hand(v, v_old, v_ref, x_t, x0, t, adv, beta, 5.0, 1e-4)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert stats["policy_loss"] == pytest.approx(policy, rel=1e-12)
    assert stats["unweighted_policy_loss"] == pytest.approx(policy / 5.0, rel=1e-12)
    assert stats["kl"] == pytest.approx(kl, rel=1e-12)
    assert stats["old_deviation"] == pytest.approx(float(np.abs((v - v_old).numpy()).mean()), rel=1e-12)
    assert stats["r01_mean"] == pytest.approx((1.0 + 0.35 + 0.55) / 3)


def test_optimality_mapping():
    adv = torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    assert nft_optimality(adv).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert nft_optimality(torch.tensor([1.0]), adv_clip_max=2.0).tolist() == [0.75]


def test_gradient_flows_only_into_the_trained_velocity():
    v, v_old, v_ref, x_t, x0, t, adv = (a.clone().requires_grad_(True) for a in _batch(1))
    beta = 0.1
    loss, _ = nft_loss(v, v_old, v_ref, x_t, x0, t, adv, beta=beta, kl_coef=0.0)
    loss.backward()
    assert all(a.grad is None for a in (v_old, v_ref, x_t, x0, t, adv))
    # By hand with the adaptive weights held constant: d/dv of (r L_pos + (1-r) L_neg) / beta * m / B
    vv, vo, xt, xx = (a.detach().numpy() for a in (v, v_old, x_t, x0))
    ts, advs = t.detach().tolist(), adv.detach().tolist()
    B, n = vv.shape[0], vv[0].size
    for i in range(B):
        r = min(max(min(max(advs[i], -5), 5) / 10 + 0.5, 0), 1)
        d_pos = xt[i] - ts[i] * (vo[i] + beta * (vv[i] - vo[i])) - xx[i]
        d_neg = xt[i] - ts[i] * (vo[i] - beta * (vv[i] - vo[i])) - xx[i]
        w_pos, w_neg = max(np.abs(d_pos).mean(), 1e-5), max(np.abs(d_neg).mean(), 1e-5)
        grad = (r * 2 * d_pos / w_pos * (-ts[i] * beta) + (1 - r) * 2 * d_neg / w_neg * (ts[i] * beta))
        grad = grad / n / beta * 5.0 / B
        np.testing.assert_allclose(v.grad[i].numpy(), grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("advantage,closer", [(5.0, True), (-5.0, False)])
def test_a_descent_step_moves_towards_good_and_away_from_bad_samples(advantage, closer):
    # One sample, old == trained at the start: a small gradient step on v changes the x0 that v reconstructs
    # (x_t - t v) towards the stored x0 for a good sample and away from it for a bad one.
    v, v_old, _, x_t, x0, t, _ = (a[:1] for a in _batch(4))
    v = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, None, x_t, x0, t, torch.tensor([advantage]), beta=0.1, kl_coef=0.0)
    (grad,) = torch.autograd.grad(loss, v)
    stepped = v.detach() - 1e-3 * grad
    before = ((x_t - t.view(-1, 1, 1) * v_old - x0) ** 2).sum()
    after = ((x_t - t.view(-1, 1, 1) * stepped - x0) ** 2).sum()
    assert (after < before) == closer


def test_kl_gradient_and_missing_reference():
    v, v_old, v_ref, x_t, x0, t, _ = _batch(2)
    v = v.clone().requires_grad_(True)
    zero_adv = torch.zeros(3, dtype=torch.float64)
    with_kl, _ = nft_loss(v, v_old, v_ref, x_t, x0, t, zero_adv, kl_coef=0.5)
    without, _ = nft_loss(v, v_old, v_ref, x_t, x0, t, zero_adv, kl_coef=0.0)
    (g_with,) = torch.autograd.grad(with_kl, v)
    (g_without,) = torch.autograd.grad(without, v)
    # d/dv 0.5 * mean_b mean_dims (v - v_ref)^2 = 0.5 * 2 (v - v_ref) / (B n)
    torch.testing.assert_close(g_with - g_without, 0.5 * 2 * (v - v_ref).detach() / v.numel(), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(v, v_old, None, x_t, x0, t, zero_adv)
    loss, stats = nft_loss(v, v_old, None, x_t, x0, t, zero_adv, kl_coef=0.0)
    assert "kl" not in stats and torch.isfinite(loss)


def test_before_any_update_positive_and_negative_velocities_are_the_trained_one_in_bf16():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 16, 8, generator=g).to(torch.bfloat16)
    old = v.clone()
    for beta in (NFT_MIX_BETA, NFT_MIX_BETA_OCR, 0.37):
        v_pos, v_neg = nft_implicit_velocities(v, old, beta)
        assert v_pos.dtype == torch.bfloat16 and torch.equal(v_pos, v) and torch.equal(v_neg, v)
    # and the loss sees no move from old: both branches give the same x0 error
    x0 = torch.randn(2, 16, 8, generator=g).to(torch.bfloat16)
    x_t = torch.randn(2, 16, 8, generator=g).to(torch.bfloat16)
    _, stats = nft_loss(v, old, v, x_t, x0, torch.tensor([0.7, 0.3]), torch.tensor([1.0, -1.0]), beta=0.1)
    assert stats["old_deviation"] == 0.0 and stats["kl"] == 0.0
    assert stats["loss_pos"] == stats["loss_neg"]


def test_ema_update():
    old = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    new = [torch.tensor([3.0, 4.0]), torch.tensor([[8.0]])]
    ema_update_(old, new, 0.25)
    assert old[0].tolist() == [1.0 * 0.25 + 3.0 * 0.75, 2.0 * 0.25 + 4.0 * 0.75] and old[1].item() == 6.0
    nan = [torch.tensor([float("nan")])]
    ema_update_(nan, [torch.tensor([5.0])], 0.0)             # decay 0 copies exactly
    assert nan[0].item() == 5.0
    with pytest.raises(ValueError):
        ema_update_(old, new[:1], 0.5)
    with pytest.raises(ValueError):
        ema_update_(old, new, 1.5)
