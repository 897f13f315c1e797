"""Registry, weighted combination (with None), per-prompt advantages."""

import pytest
from PIL import Image

import rewards
from rewards import CombinedReward, combine, get_reward, per_prompt_advantages, register_reward


def test_builtin_rewards_registered():
    names = rewards.available_rewards()
    for n in ("ocr", "clip_score", "pickscore", "hpsv2", "aesthetic", "jpeg_compressibility", "brightness",
              "vlm_judge"):
        assert n in names
    assert names == sorted(names)
    with pytest.raises(KeyError, match="unknown reward 'nope'.*brightness"):
        get_reward("nope")


def test_register_function_and_factory():
    @register_reward("test_const", overwrite=True)
    def const(prompts, images, value=0.25, **columns):
        return [value] * len(prompts)

    @register_reward("test_scaled", overwrite=True)
    class Scaled:
        def __init__(self, k=1.0):
            self.k = k

        def __call__(self, prompts, images, **columns):
            return [self.k * len(p) for p in prompts]

    assert get_reward("test_const") is const
    assert get_reward("test_const", value=0.5)(["a", "b"], [None, None]) == [0.5, 0.5]
    s = get_reward("test_scaled", k=2.0)
    assert isinstance(s, Scaled) and s(["abc"], [None]) == [6.0]
    assert rewards.reward_name(s) == "test_scaled"
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_const")(lambda p, i, **c: [0.0] * len(p))


def fa(prompts, images, **c):
    return [1.0, None, None, 0.0]


def fb(prompts, images, **c):
    return [0.5, 0.25, None, float("nan")]


@pytest.mark.parametrize(
    "mode, expected",
    [("renormalize", [2.0, 0.75, None, 0.0]), ("skip", [2.0, 0.5, None, 0.0]), ("zero", [2.0, 0.5, 0.0, 0.0])],
)
def test_combined_none_handling(mode, expected):
    c = CombinedReward([fa, fb], [1.0, 2.0], none_mode=mode)
    res = c.compute(["p"] * 4, [None] * 4)
    assert res.total == pytest.approx(expected) if None not in expected else res.total == expected
    assert res.per_reward == {"fa": [1.0, None, None, 0.0], "fb": [0.5, 0.25, None, None]}  # NaN -> None
    assert res.weights == {"fa": 1.0, "fb": 2.0}
    assert c(["p"] * 4, [None] * 4) == res.total


def test_combine_by_name_with_real_rewards():
    white, black = Image.new("RGB", (32, 32), "white"), Image.new("RGB", (32, 32), "black")
    c = combine({"brightness": 1.0, "jpeg_compressibility": 0.5})
    res = c.compute(["a", "b"], [white, black])
    assert set(res.per_reward) == {"brightness", "jpeg_compressibility"}
    assert res.per_reward["brightness"] == pytest.approx([1.0, 0.0])
    for i in range(2):
        want = res.per_reward["brightness"][i] + 0.5 * res.per_reward["jpeg_compressibility"][i]
        assert res.total[i] == pytest.approx(want)
    m = res.means()
    assert m["brightness"] == pytest.approx(0.5) and m["total"] == pytest.approx(sum(res.total) / 2)
    # same reward twice with different options gets a unique name; (name, kwargs) pairs work
    c2 = CombinedReward([("jpeg_compressibility", {"quality": 10}), "jpeg_compressibility"])
    assert c2.names == ["jpeg_compressibility", "jpeg_compressibility_2"]
    with pytest.raises(ValueError):
        CombinedReward(["brightness"], [1.0, 2.0])
    with pytest.raises(ValueError):
        CombinedReward([])


def test_combined_reports_length_mismatch():
    with pytest.raises(ValueError, match="returned 1 values"):
        CombinedReward([lambda p, i, **c: [1.0]])(["a", "b"], [None, None])


def test_per_prompt_advantages():
    prompts = ["a", "a", "b", "b", "b", "c"]
    r = [1.0, 3.0, 0.0, 0.0, None, 5.0]
    adv = per_prompt_advantages(prompts, r, eps=0.0 + 1e-4)
    assert adv[0] == pytest.approx(-1.0, abs=1e-3) and adv[1] == pytest.approx(1.0, abs=1e-3)
    assert adv[2:] == [0.0, 0.0, 0.0, 0.0]  # equal rewards, None, single sample -> 0
    g = per_prompt_advantages(["a", "a", "b", "b"], [1.0, 3.0, 0.0, 4.0], global_std=True)
    # global std of [1,3,0,4] = sqrt(2.5)
    assert g[0] == pytest.approx(-1 / 2.5 ** 0.5, abs=1e-3) and g[3] == pytest.approx(2 / 2.5 ** 0.5, abs=1e-3)
    assert max(per_prompt_advantages(["a", "a"], [0.0, 1.0], clip=0.5)) == 0.5


def test_reward_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_pkg").mkdir()
    (tmp_path / "my_rewards_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_rewards_pkg" / "scores.py").write_text(
        "def prompt_length(prompts, images, scale=1.0, **columns):\n"
        "    return [scale * len(p) for p in prompts]\n\n"
        "class Constant:\n"
        "    def __init__(self, value=0.5):\n"
        "        self.value = value\n\n"
        "    def __call__(self, prompts, images, **columns):\n"
        "        return [self.value] * len(prompts)\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward("my_rewards_pkg.scores.prompt_length", scale=2.0)
    assert fn(["abc", "a"], [None, None]) == [6.0, 2.0]
    assert get_reward("my_rewards_pkg.scores.Constant", value=0.25)(["x"], [None]) == [0.25]
    mixed = combine(["my_rewards_pkg.scores.prompt_length", "my_rewards_pkg.scores.Constant"], [1.0, 2.0])
    assert mixed(["ab"], [None]) == [2.0 + 2 * 0.5]
    with pytest.raises(KeyError, match="cannot import 'no_such_pkg'"):
        get_reward("no_such_pkg.reward")
    with pytest.raises(KeyError, match="has no callable 'NOT_CALLABLE'"):
        get_reward("my_rewards_pkg.scores.NOT_CALLABLE")
