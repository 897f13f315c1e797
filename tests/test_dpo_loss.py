"""Flow-DPO loss vs an independent scalar hand computation, and the direction of its gradient."""

import math

import pytest
import torch

from align.losses import flow_dpo_loss, make_noisy, velocity_error


def _hand(ew, el, rw, rl, beta, loss_type):
    # Written from the formulas in the Qwen-Image report / TRL, one pair at a time with the math module.
    out = []
    for a, b, c, d in zip(ew, el, rw, rl):
        inside = -(beta / 2) * ((a - c) - (b - d))
        if loss_type == "sigmoid":
            out.append(-math.log(1 / (1 + math.exp(-inside))))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - inside))
        else:
            out.append((inside / beta - 1 / (2 * beta)) ** 2)
    return sum(out) / len(out)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.5, 100.0])
def test_loss_matches_hand_computation(loss_type, beta):
    g = torch.Generator().manual_seed(1)
    ew, el, rw, rl = (torch.rand(7, generator=g, dtype=torch.float64) * 0.05 + 0.5 for _ in range(4))
    loss, metrics = flow_dpo_loss(ew, el, rw, rl, beta=beta, loss_type=loss_type)
    expected = _hand(ew.tolist(), el.tolist(), rw.tolist(), rl.tolist(), beta, loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # Implicit rewards and accuracy, by hand.
    chosen = [-beta / 2 * (a - c) for a, c in zip(ew.tolist(), rw.tolist())]
    rejected = [-beta / 2 * (b - d) for b, d in zip(el.tolist(), rl.tolist())]
    acc = sum(c > r for c, r in zip(chosen, rejected)) / 7
    assert metrics["rewards/accuracies"].item() == pytest.approx(acc)
    assert metrics["rewards/margins"].item() == pytest.approx(sum(chosen) / 7 - sum(rejected) / 7, rel=1e-5)
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(chosen) / 7, rel=1e-5)
    assert metrics["error/ref_rejected"].item() == pytest.approx(rl.mean().item())
    assert metrics["error/policy_chosen"].item() == pytest.approx(ew.mean().item())


def test_policy_equal_to_reference_gives_log2_and_zero_margin():
    e = torch.rand(5)
    loss, metrics = flow_dpo_loss(e, e + 0.1, e, e + 0.1, beta=100.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["rewards/margins"].item() == 0.0
    assert metrics["rewards/accuracies"].item() == 0.0  # ties are not "correct"


def test_reference_gets_no_gradient():
    ref = torch.rand(4, requires_grad=True)
    pol = torch.rand(4, requires_grad=True)
    loss, _ = flow_dpo_loss(pol, pol * 0.9, ref, ref * 1.1, beta=10.0)
    loss.backward()
    assert ref.grad is None and pol.grad is not None


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_one_step_lowers_winner_error_relative_to_loser(loss_type):
    # Velocities predicted by a free parameter per image: one SGD step on the DPO loss must lower
    # (e_w - e_l) for the policy, with the reference held where the policy started.
    g = torch.Generator().manual_seed(0)
    x_w, x_l, noise = (torch.randn(3, 8, 64, generator=g) for _ in range(3))
    sigma = torch.rand(3, generator=g)
    _, v_w = make_noisy(x_w, noise, sigma)
    _, v_l = make_noisy(x_l, noise, sigma)
    start = torch.randn(6, 8, 64, generator=g)
    pred = torch.nn.Parameter(start.clone())
    ref_w, ref_l = velocity_error(start[:3], v_w), velocity_error(start[3:], v_l)
    loss, _ = flow_dpo_loss(velocity_error(pred[:3], v_w), velocity_error(pred[3:], v_l), ref_w, ref_l,
                            beta=5.0, loss_type=loss_type)
    loss.backward()
    with torch.no_grad():
        pred -= 0.5 * pred.grad
        gap_after = velocity_error(pred[:3], v_w) - velocity_error(pred[3:], v_l)
    gap_before = ref_w - ref_l
    assert (gap_after < gap_before).all()


def test_user_errors_are_clear():
    e = torch.rand(3)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        flow_dpo_loss(e, e, e, e, loss_type="robust")
    with pytest.raises(ValueError, match="beta must be > 0"):
        flow_dpo_loss(e, e, e, e, beta=0)
    with pytest.raises(ValueError, match="same shape"):
        flow_dpo_loss(e, e, e, torch.rand(4))
