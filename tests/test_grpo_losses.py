"""Flow-GRPO loss pieces against hand computations."""

import math

import pytest
import torch

from align.losses import gaussian_kl, group_advantages, grpo_clip_loss, num_train_timesteps


def test_group_advantages_match_hand_computation():
    rewards = [1.0, 2.0, 3.0, 0.0, 0.0, 4.0]
    adv = group_advantages(rewards, group_size=3, clip=None)
    # group 1: mean 2, population std sqrt(2/3); group 2: mean 4/3, std sqrt(((4/3)^2*2 + (8/3)^2)/3)
    s1 = math.sqrt(2 / 3)
    m2 = 4 / 3
    s2 = math.sqrt(((0 - m2) ** 2 * 2 + (4 - m2) ** 2) / 3)
    expected = [-1 / (s1 + 1e-4), 0.0, 1 / (s1 + 1e-4), -m2 / (s2 + 1e-4), -m2 / (s2 + 1e-4), (4 - m2) / (s2 + 1e-4)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_group_advantages_unscaled_clipped_and_batch_std():
    rewards = [0.0, 10.0, 5.0, 5.0]
    assert group_advantages(rewards, 2, scale_rewards=False, clip=None).tolist() == [-5.0, 5.0, 0.0, 0.0]
    assert group_advantages(rewards, 2, scale_rewards=False, clip=2.0).tolist() == [-2.0, 2.0, 0.0, 0.0]
    batch_std = torch.tensor(rewards).std(unbiased=False).item()
    adv = group_advantages(rewards, 2, scale_rewards="batch", clip=None)
    assert adv.tolist() == pytest.approx([-5 / (batch_std + 1e-4), 5 / (batch_std + 1e-4), 0.0, 0.0])


def test_group_advantages_ignore_none_rewards():
    adv = group_advantages([1.0, None, 3.0, None, None, None], group_size=3, clip=None)
    assert adv[1] == 0.0 and adv[3:].tolist() == [0.0, 0.0, 0.0]
    assert adv[0].item() == pytest.approx(-1 / (1 + 1e-4)) and adv[2].item() == pytest.approx(1 / (1 + 1e-4))
    # identical rewards: zero advantage, no division blow-up
    assert group_advantages([2.0, 2.0], 2).tolist() == [0.0, 0.0]


def test_group_advantages_rejects_bad_group_size():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1.0, 2.0, 3.0], 4)


def test_clip_loss_matches_hand_computation():
    old = torch.zeros(4)
    lp = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.05]))
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    eps = 0.1
    loss, m = grpo_clip_loss(lp, old, adv, eps)
    # per sample max(-A r, -A clip(r)): r=1 -> -1; r=1.5,A=1 -> max(-1.5,-1.1)=-1.1; r=0.5,A=-2 -> max(1.0,1.8)=1.8;
    # r=1.05,A=-1 -> max(1.05, 1.05)=1.05
    assert loss.item() == pytest.approx((-1 - 1.1 + 1.8 + 1.05) / 4, rel=1e-6)
    assert m["ratio_min"] == pytest.approx(0.5) and m["ratio_max"] == pytest.approx(1.5)
    assert m["clip_fraction"] == pytest.approx(0.5)


def test_clip_loss_gradient_at_ratio_one_is_minus_advantage():
    lp = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss, m = grpo_clip_loss(lp, lp.detach().clone(), adv, 1e-4)
    loss.backward()
    assert m["ratio_mean"] == 1.0 and m["clip_fraction"] == 0.0
    assert torch.allclose(lp.grad, -adv / 3)


def test_gaussian_kl_forms():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    std_t, dt = 0.5, -0.1
    fg = gaussian_kl(mean, ref, std_t, dt)
    assert fg.tolist() == pytest.approx([(1 + 4) / 2 / (2 * 0.25), 0.5 / (2 * 0.25)])
    ex = gaussian_kl(mean, ref, std_t, dt, form="exact")
    assert ex.tolist() == pytest.approx([5 / (2 * 0.25 * 0.1), 1 / (2 * 0.25 * 0.1)])
    # exact KL of two isotropic Gaussians with per-element std s = std_t sqrt(|dt|): ||dmu||^2 / (2 s^2)
    s = std_t * math.sqrt(0.1)
    p = torch.distributions.Normal(mean, s)
    q = torch.distributions.Normal(ref, s)
    assert ex.tolist() == pytest.approx(torch.distributions.kl_divergence(p, q).sum(1).tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="kl_form"):
        gaussian_kl(mean, ref, std_t, dt, form="k3")


def test_num_train_timesteps():
    assert num_train_timesteps(10, 0.99) == 9
    assert num_train_timesteps(10, 1.0) == 10
    assert num_train_timesteps(2, 0.3) == 1
    with pytest.raises(ValueError):
        num_train_timesteps(10, 0.0)
