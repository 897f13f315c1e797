"""Diffusion-KTO loss against a hand computation from the paper's definition; implicit rewards and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses.flow_matching import velocity_error
from align.losses.kto import KTO_BETA, kto_implicit_reward, kto_loss


def _hand(pol, ref, labels, beta, w_d, w_u, offset=None):
    # g = -(policy error) + (reference error); z = max(0, batch mean of g) unless given; h = sigmoid(s beta (g - z))
    g = [-p + r for p, r in zip(pol, ref)]
    z = max(0.0, sum(g) / len(g)) if offset is None else offset
    total = 0.0
    for gi, y in zip(g, labels):
        s = 1.0 if y else -1.0
        h = 1 / (1 + math.exp(-s * beta * (gi - z)))
        total += (w_d if y else w_u) * (1 - h)
    return total / len(g), g, z


@pytest.mark.parametrize("beta,w_d,w_u", [(KTO_BETA, 1.0, 1.0), (50.0, 1.0, 1.33)])
def test_loss_matches_hand_computation(beta, w_d, w_u):
    gen = torch.Generator().manual_seed(0)
    pol = torch.rand(8, generator=gen, dtype=torch.float64) * 0.01 + 0.5
    ref = torch.rand(8, generator=gen, dtype=torch.float64) * 0.01 + 0.5
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    loss, m = kto_loss(pol, ref, labels, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    expected, g, z = _hand(pol.tolist(), ref.tolist(), labels.tolist(), beta, w_d, w_u)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert float(m["kl"]) == pytest.approx(z, abs=1e-15)
    d = [beta * gi for gi, y in zip(g, labels.tolist()) if y]
    u = [beta * gi for gi, y in zip(g, labels.tolist()) if not y]
    assert float(m["rewards/desirable"]) == pytest.approx(sum(d) / 4, rel=1e-12)
    assert float(m["rewards/margins"]) == pytest.approx(sum(d) / 4 - sum(u) / 4, rel=1e-12)
    acc = sum((gi - z > 0) if y else (gi - z < 0) for gi, y in zip(g, labels.tolist())) / 8
    assert float(m["rewards/accuracies"]) == pytest.approx(acc)
    assert float(m["count/desirable"]) == 4.0


def test_offset_is_clamped_at_zero_detached_and_overridable():
    pol = torch.tensor([0.6, 0.7, 0.5], dtype=torch.float64, requires_grad=True)  # worse than ref: mean g < 0
    ref = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    labels = torch.tensor([True, False, True])
    loss, m = kto_loss(pol, ref, labels, beta=10.0)
    loss = loss.detach()
    assert float(m["kl"]) == 0.0
    assert float(loss) == pytest.approx(_hand(pol.tolist(), ref.tolist(), labels.tolist(), 10.0, 1, 1)[0], rel=1e-12)
    loss, m = kto_loss(pol, ref, labels, beta=10.0, kl_offset=-0.05)
    loss = loss.detach()
    assert float(loss) == pytest.approx(_hand(pol.tolist(), ref.tolist(), labels.tolist(), 10.0, 1, 1, -0.05)[0],
                                        rel=1e-12)
    # all-reduce mean of the offset: another process's mean g enters z
    better = torch.tensor([0.4, 0.45, 0.5], dtype=torch.float64)
    _, m = kto_loss(better, ref, labels, beta=10.0, all_reduce_mean=lambda z: (z + torch.tensor(0.0)) / 2)
    assert float(m["kl"]) == pytest.approx((0.1 + 0.05) / 3 / 2)


def test_gradient_only_into_the_policy_error_with_the_offset_held_constant():
    gen = torch.Generator().manual_seed(1)
    pol = (torch.rand(6, generator=gen, dtype=torch.float64) * 0.01 + 0.5).requires_grad_(True)
    ref = (torch.rand(6, generator=gen, dtype=torch.float64) * 0.01 + 0.5).requires_grad_(True)
    labels = torch.tensor([True, True, False, False, True, False])
    beta = 200.0
    loss, m = kto_loss(pol, ref, labels, beta=beta, undesirable_weight=2.0)
    loss.backward()
    assert ref.grad is None
    z = float(m["kl"])
    for i in range(6):
        s = 1.0 if labels[i] else -1.0
        w = 1.0 if labels[i] else 2.0
        x = s * beta * (-(float(pol.detach()[i]) - float(ref.detach()[i])) - z)
        h = 1 / (1 + math.exp(-x))
        # d/dpol_i of w (1 - h(x)) / B with dx/dpol_i = -s beta (z held constant)
        assert float(pol.grad[i]) == pytest.approx(w * h * (1 - h) * s * beta / 6, rel=1e-9)
    # desirable: gradient descent lowers its error; undesirable: raises it
    assert all((float(pol.grad[i]) > 0) == bool(labels[i]) for i in range(6))


def test_implicit_rewards_are_zero_when_policy_is_reference_in_bf16():
    gen = torch.Generator().manual_seed(2)
    target = torch.randn(5, 8, 4, generator=gen).to(torch.bfloat16)
    v = torch.randn(5, 8, 4, generator=gen).to(torch.bfloat16)
    pol_err, ref_err = velocity_error(v, target), velocity_error(v.clone(), target)
    assert torch.equal(kto_implicit_reward(pol_err, ref_err), torch.zeros(5))
    assert torch.equal(kto_implicit_reward(pol_err.bfloat16(), ref_err.bfloat16()), torch.zeros(5))
    labels = torch.tensor([True, False, True, False, False])
    loss, m = kto_loss(pol_err, ref_err, labels, undesirable_weight=3.0)
    assert float(m["rewards/margins"]) == 0.0 and float(m["kl"]) == 0.0 and float(m["rewards/accuracies"]) == 0.0
    assert float(loss) == pytest.approx((2 * 1.0 + 3 * 3.0) * 0.5 / 5)       # every h = sigmoid(0) = 1/2


def test_bad_inputs():
    e = torch.zeros(3)
    with pytest.raises(ValueError, match="bool"):
        kto_loss(e, e, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        kto_loss(e, e, torch.tensor([True, False]))
    _, m = kto_loss(e, e, torch.tensor([True, True, True]))
    assert math.isnan(float(m["rewards/undesirable"])) and float(m["count/undesirable"]) == 0.0
