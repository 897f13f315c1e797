"""The checks every online reward goes through (align/rl/rewards.py), objective-neutral: one number or None per
image, and a training reward that gives no signal for NO_SIGNAL_LIMIT scorings in a row stops the run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from align.rl.rewards import NO_SIGNAL_LIMIT, SignalWatch, build_reward, check_reward_values
from align.rl.rollouts import score_images
from qwen_image.errors import UserError


def _args(*funcs, **extra):
    return SimpleNamespace(reward_funcs=list(funcs), reward_weights=None, reward_kwargs={}, monitor_reward_funcs=[],
                           **extra)


@pytest.mark.parametrize("values, expected", [
    ([1, 2.5, None, math.nan], [1.0, 2.5, None, None]),
    (np.array([0.5, 1.0, 0.0, 2.0], dtype=np.float32), [0.5, 1.0, 0.0, 2.0]),
    (torch.tensor([1.0, 2.0, 3.0, 4.0]), [1.0, 2.0, 3.0, 4.0]),
])
def test_numbers_none_nan_arrays_and_tensors_are_accepted(values, expected):
    assert check_reward_values("r", values, 4) == expected


@pytest.mark.parametrize("values, message", [
    ([1.0, 2.0], "reward 'r' returned 2 values for 4 images"),
    (0.5, "reward 'r' returned a float, not a list of 4 scores"),
    ("good", "reward 'r' returned a str"),
    ({"a": 1}, "reward 'r' returned a dict"),
    ([1.0, "x", 2.0, 3.0], "returned 'x' (str) for image 1"),
    ([1.0, True, 2.0, 3.0], "returned True (bool) for image 1"),
    ([1.0, math.inf, 2.0, 3.0], "returned inf for image 1"),
])
def test_anything_else_is_one_line_naming_the_reward(values, message):
    with pytest.raises(UserError) as err:
        check_reward_values("r", values, 4)
    assert message in str(err.value)


class _Fixed:
    """A reward whose every call returns the next of ``outputs``."""

    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.reward_name = "fixed"

    def __call__(self, prompts, images, **columns):
        return self.outputs.pop(0)


def _watch(outputs, limit=NO_SIGNAL_LIMIT) -> SignalWatch:
    from rewards import combine

    reward = combine([_Fixed(outputs)])
    return SignalWatch(reward, limit)


def test_no_signal_stops_after_the_limit_and_not_before():
    watch = _watch([[None, None]] * NO_SIGNAL_LIMIT)
    for _ in range(NO_SIGNAL_LIMIT - 1):
        watch.compute(["a", "b"], [None, None])
    with pytest.raises(UserError, match="scored every image None / NaN for 3 rollout batches in a row"):
        watch.compute(["a", "b"], [None, None])


def test_zero_spread_is_judged_over_the_window_so_batches_of_one_image_do_not_stop_a_real_reward():
    varying = _watch([[0.1], [0.2], [0.3], [0.4], [0.5]])
    for _ in range(5):
        varying.compute(["a"], [None])  # one image per scoring: its spread alone is always 0
    constant = _watch([[0.5], [0.5], [0.5]])
    constant.compute(["a"], [None])
    constant.compute(["a"], [None])
    with pytest.raises(UserError, match=r"gave every image the same score \(0.5\)"):
        constant.compute(["a"], [None])


def test_a_signal_in_the_window_keeps_the_run_going_and_limit_0_switches_the_check_off():
    watch = _watch([[None, None], [None, 1.0], [None, None], [None, None], [0.2, 0.3]])
    for _ in range(5):
        watch.compute(["a", "b"], [None, None])
    off = _watch([[None, None]] * 5, limit=0)
    for _ in range(5):
        off.compute(["a", "b"], [None, None])


def test_build_reward_checks_every_part_and_names_it(tmp_path, monkeypatch):
    (tmp_path / "user_rewards.py").write_text("def short(prompts, images, **kw):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward(_args("brightness", "user_rewards.short"))
    from PIL import Image

    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), "white")]
    with pytest.raises(UserError, match="reward 'user_rewards.short' returned 1 values for 2 images"):
        score_images(reward, ["a", "b"], images)
    monitor = build_reward(_args("brightness"), watch_signal=False)  # monitors are not stopped for lack of spread
    assert not isinstance(monitor, SignalWatch)
    totals, per = score_images(monitor, ["a", "b"], images)
    assert totals[0] < totals[1] and set(per) == {"brightness"}


def test_beside_other_terms_zero_spread_warns_once_per_streak_and_none_still_stops(caplog):
    """The combined objective with DPO / KTO / flow matching training: a reward saturated on its prompts (every
    rollout the same score) leaves those terms training, with one warning per streak; a broken reward still stops."""
    from rewards import combine

    saturated = SignalWatch(combine([_Fixed([[1.0, 1.0]] * 4 + [[0.2, 0.9]] + [[1.0, 1.0]] * 3)]), 3,
                            stop_on_zero_spread=False)
    with caplog.at_level("WARNING", logger="align.rl.rewards"):
        for _ in range(8):
            saturated.compute(["a", "b"], [None, None])
    warnings = [r.getMessage() for r in caplog.records if "gave every image the same score (1)" in r.getMessage()]
    assert len(warnings) == 2 and "the other terms go on training" in warnings[0]  # streaks at scorings 3 and 8
    broken = SignalWatch(combine([_Fixed([[None, None]] * 3)]), 3, stop_on_zero_spread=False)
    broken.compute(["a", "b"], [None, None])
    broken.compute(["a", "b"], [None, None])
    with pytest.raises(UserError, match="scored every image None / NaN"):
        broken.compute(["a", "b"], [None, None])
