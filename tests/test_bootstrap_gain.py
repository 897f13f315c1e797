"""The paired bootstrap over seeds that reports each demo stage's gain."""

from __future__ import annotations

import numpy as np
import pytest

from align.evaluation import bootstrap_gain


def test_two_seeds_give_the_hand_computed_interval():
    # diffs 0 and 1: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> the 95 % range is [0, 1]
    out = bootstrap_gain([[0.2, 0.3]], [[0.2, 1.3]], n_resamples=4000)
    o = out["overall"]
    assert o["gain"] == pytest.approx(0.5)
    assert (o["low"], o["high"]) == (pytest.approx(0.0), pytest.approx(1.0))
    assert o["before"] == pytest.approx(0.25) and o["after"] == pytest.approx(0.75)
    assert not o["excludes_zero"]


def test_constant_difference_collapses_the_interval():
    rng = np.random.default_rng(1)
    before = rng.random((3, 16))
    out = bootstrap_gain(before, before + 0.1)
    for r in [out["overall"], *out["per_prompt"]]:
        assert r["gain"] == pytest.approx(0.1) and r["low"] == pytest.approx(0.1) and r["high"] == pytest.approx(0.1)
        assert r["excludes_zero"]


def test_a_real_effect_excludes_zero_and_noise_does_not():
    rng = np.random.default_rng(0)
    before = rng.random((4, 32))
    noisy = before + rng.normal(0, 0.3, size=before.shape)
    better = noisy + 0.25
    assert bootstrap_gain(before, better)["overall"]["excludes_zero"]
    assert bootstrap_gain(before, before + rng.normal(0, 0.3, size=before.shape))["overall"]["low"] < 0


def test_per_prompt_rows_and_overall_mean():
    before = np.zeros((2, 4))
    after = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, -1.0, 0.0, -1.0]])
    out = bootstrap_gain(before, after, seed=3)
    assert out["overall"]["gain"] == pytest.approx(0.25)
    assert [r["gain"] for r in out["per_prompt"]] == pytest.approx([1.0, -0.5])
    assert out["per_prompt"][1]["low"] >= -1.0 and out["per_prompt"][1]["high"] <= 0.0
    assert bootstrap_gain(before, after, seed=3) == out                          # deterministic for a seed


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="same"):
        bootstrap_gain(np.zeros((2, 4)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="2 seeds"):
        bootstrap_gain([[0.0]], [[1.0]])
