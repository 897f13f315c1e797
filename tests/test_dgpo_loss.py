"""DGPO's group-weighted loss against a hand computation, groups spanning processes, clipping and shared noise."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses.dgpo import DGPO_BETA_DPO, dgpo_group_weights, dgpo_loss, group_shared_noise
from align.losses.flow_matching import velocity_error


def _batch():
    err = torch.tensor([0.50, 0.40, 0.62, 0.30, 0.45, 0.52], dtype=torch.float64)
    ref = torch.tensor([0.51, 0.42, 0.60, 0.33, 0.44, 0.50], dtype=torch.float64)
    old = torch.tensor([0.50, 0.41, 0.60, 0.29, 0.45, 0.53], dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 6.0, -1.0, 0.5, -6.0], dtype=torch.float64)
    groups = torch.tensor([0, 1, 0, 2, 1, 2])       # interleaved: group order is not batch order
    kl = torch.tensor([0.01, 0.02, 0.00, 0.03, 0.01, 0.02], dtype=torch.float64)
    return err, ref, old, adv, groups, kl


def _hand(err, ref, old, adv, groups, kl, beta_dpo, clip, kl_coef, clip_kl=False):
    err, ref, old, adv, groups, kl = (x.tolist() for x in (err, ref, old, adv, groups, kl))
    adv = [min(max(a, -5.0), 5.0) for a in adv]
    score = {}
    for g in set(groups):
        members = [i for i in range(len(err)) if groups[i] == g]
        score[g] = sum(adv[i] * beta_dpo * (err[i] - ref[i]) for i in members) / len(members)
    policy, kls, n_clipped = 0.0, 0.0, 0
    for i in range(len(err)):
        w = 1 / (1 + math.exp(-score[groups[i]]))
        r = math.exp(old[i] - err[i])
        clipped = r > 1 + clip if adv[i] > 0 else r < 1 - clip
        n_clipped += clipped
        policy += w * adv[i] * err[i]           # same value clipped or not: clipping only stops the gradient
        kls += kl[i]
    n = len(err)
    return policy / n + kl_coef * kls / n, score, n_clipped / n


def test_loss_matches_hand_computation():
    err, ref, old, adv, groups, kl = _batch()
    loss, stats = dgpo_loss(err, ref, adv, groups, 3, beta_dpo=DGPO_BETA_DPO, old_err=old, clip_range=5e-3, kl=kl,
                            kl_coef=0.02)
    expected, score, frac = _hand(err, ref, old, adv, groups, kl, 100.0, 5e-3, 0.02)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert stats["clip_fraction"] == pytest.approx(frac) and 0 < frac < 1
    assert stats["group_score_max"] == pytest.approx(max(score.values()), rel=1e-12)
    assert stats["kl"] == pytest.approx(sum(kl.tolist()) / 6, rel=1e-12)
    weights, scores = dgpo_group_weights(err, ref, adv.clamp(-5, 5), groups, 3, 100.0)
    assert scores.tolist() == pytest.approx([score[0], score[1], score[2]], rel=1e-12)
    assert weights.tolist() == pytest.approx([1 / (1 + math.exp(-score[int(g)])) for g in groups], rel=1e-12)


def test_gradient_flows_through_err_only_and_is_stopped_where_clipped():
    err, ref, old, adv, groups, kl = _batch()
    err, ref, old, kl = (x.clone().requires_grad_(True) for x in (err, ref, old, kl))
    clip = 5e-3
    loss, _ = dgpo_loss(err, ref, adv, groups, 3, old_err=old, clip_range=clip, kl=kl, kl_coef=0.02, clip_kl=True)
    loss.backward()
    assert ref.grad is None and old.grad is None
    _, score, _ = _hand(*(x.detach() for x in (err, ref, old, adv, groups, kl)), 100.0, clip, 0.02)
    advc = adv.clamp(-5, 5).tolist()
    for i in range(6):
        r = math.exp(float(old.detach()[i]) - float(err.detach()[i]))
        clipped = r > 1 + clip if advc[i] > 0 else r < 1 - clip
        w = 1 / (1 + math.exp(-score[int(groups[i])]))
        assert float(err.grad[i]) == pytest.approx(0.0 if clipped else w * advc[i] / 6, abs=1e-15)
        assert float(kl.grad[i]) == pytest.approx(0.0 if clipped else 0.02 / 6)


def test_groups_spanning_two_processes_match_one_process():
    err, ref, old, adv, groups, kl = _batch()
    halves = (slice(0, 3), slice(3, 6))
    local = {}

    def capture(k):
        def reduce(x):
            local[k] = x.clone()
            return x
        return reduce

    for k, h in enumerate(halves):           # each "process" reports its local group sums
        dgpo_loss(err[h], ref[h], adv[h], groups[h], 3, old_err=old[h], all_reduce=capture(k))
    losses = []
    for k, h in enumerate(halves):           # then runs with the all-reduce that adds the other's sums
        other = local[1 - k]
        loss, _ = dgpo_loss(err[h], ref[h], adv[h], groups[h], 3, old_err=old[h], all_reduce=lambda x, o=other: x + o)
        losses.append(float(loss))
    single, _ = dgpo_loss(err, ref, adv, groups, 3, old_err=old)
    assert sum(losses) / 2 == pytest.approx(float(single), rel=1e-12)     # DDP averages equal-sized processes
    alone, _ = dgpo_loss(err[:3], ref[:3], adv[:3], groups[:3], 3, old_err=old[:3])
    assert float(alone) != pytest.approx(losses[0], rel=1e-6)             # without the reduce the weights differ


def test_ratio_is_exactly_one_before_an_update_in_bf16():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 8, 4, generator=g).to(torch.bfloat16)
    v = torch.randn(4, 8, 4, generator=g).to(torch.bfloat16)
    old_err = velocity_error(v.clone(), target)                      # the sampling policy == the trained one
    err = velocity_error(v.clone().requires_grad_(True), target)
    ref_err = velocity_error(torch.randn(4, 8, 4, generator=g).to(torch.bfloat16), target)
    _, stats = dgpo_loss(err, ref_err, torch.tensor([1.0, -1.0, 2.0, -2.0]), torch.tensor([0, 0, 1, 1]), 2,
                         old_err=old_err, clip_range=1e-5)
    assert stats["ratio_min"] == stats["ratio_max"] == 1.0 and stats["clip_fraction"] == 0.0


def test_shared_noise_per_group():
    ids = torch.tensor([2, 0, 2, 1])
    noise = group_shared_noise(ids, 3, (5, 2), torch.Generator().manual_seed(1))
    assert noise.shape == (4, 5, 2) and torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    # another process holding other members of the same groups draws the same table
    other = group_shared_noise(torch.tensor([0, 1]), 3, (5, 2), torch.Generator().manual_seed(1))
    assert torch.equal(other[0], noise[1]) and torch.equal(other[1], noise[3])
    with pytest.raises(ValueError):
        group_shared_noise(torch.tensor([3]), 3, (2,), torch.Generator())
