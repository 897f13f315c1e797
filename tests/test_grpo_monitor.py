"""Over-optimisation monitors: the held-out reward (ODE, fixed seeds, prompts never trained on) rises when GRPO
learns a real reward; with a reward that can be hacked, the monitor flags the held-out drop, the early stop ends
the run and the best held-out checkpoint is what gets saved. Plus the guard's rule on hand-made sequences."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from align.rl.monitor import OverOptimizationGuard, mean_pairwise_rms, training_reward_since
from rewards import register_reward
from rewards.images import to_pil

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes/tiny/grpo_brightness.yaml")
HELD_OUT = ["a quiet harbour at noon", "a paper lantern"]


def _corner(images) -> list[float]:
    return [float(np.asarray(to_pil(im).convert("L"), dtype=np.float64)[:8, :8].mean() / 255.0) for im in images]


@register_reward("test_corner_brightness")
def corner_brightness(prompts, images, **columns):
    """A reward that can be hacked: brightness of the top-left 8x8 pixels only."""
    return _corner(images)


@register_reward("test_corner_darkness")
def corner_darkness(prompts, images, **columns):
    """A held-out judge that disagrees with the hack (stands for 'the rest of the picture got worse')."""
    return [1.0 - v for v in _corner(images)]


def test_guard_rule():
    g = OverOptimizationGuard(patience=2)
    assert [g.update(h, t) for h, t in [(0.5, 0.1), (0.4, 0.2), (0.3, 0.3)]] == [0, 1, 2]
    assert g.should_stop(2) and not g.should_stop(1)
    g = OverOptimizationGuard(patience=2)
    assert [g.update(h, t) for h, t in [(0.5, 0.3), (0.4, 0.2)]] == [0, 0]  # both fall: a bad run, not hacking
    assert [g.update(h, t) for h, t in [(0.6, 0.3), (0.7, 0.4)]] == [0, 0]
    assert not OverOptimizationGuard(patience=0).should_stop(5)
    history = [{"reward": 0.1, "step": 1}, {"reward": 0.3, "step": 2}, {"reward": 0.5, "step": 3}]
    assert training_reward_since(history, "reward", 1) == pytest.approx(0.4)
    assert training_reward_since(history, "reward", 3) == 0.5
    a, b = np.zeros((4, 4)), np.ones((4, 4))
    assert mean_pairwise_rms([a, b, a]) == pytest.approx(2 / 3) and np.isnan(mean_pairwise_rms([a]))


def _history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_held_out_brightness_rises(tmp_path):
    from align.grpo import main

    trainer = main(["--config", RECIPE, "--output_dir", str(tmp_path), "--max_steps", "8", "--monitor_prompts",
                    *HELD_OUT, "--monitor_seeds", "2", "--eval_strategy", "steps", "--eval_steps", "4",
                    "--eval_on_start", "true", "--disable_tqdm", "true"])
    evals = [h for h in _history(tmp_path) if "eval_reward" in h]
    print("held-out brightness:", [round(h["eval_reward"], 4) for h in evals])
    assert [h["step"] for h in evals] == [0, 4, 8]
    assert evals[-1]["eval_reward"] > evals[0]["eval_reward"] + 0.005
    assert all(h["eval_diversity"] > 0 and h["eval_overopt_flag"] == 0.0 for h in evals)
    train = [h for h in _history(tmp_path) if "group_diversity" in h]
    assert train and all(h["group_diversity"] > 0 for h in train)
    assert trainer.state.global_step == 8


def test_hacked_reward_is_flagged_and_best_checkpoint_kept(tmp_path):
    from align.grpo import main

    trainer = main(["--config", RECIPE, "--output_dir", str(tmp_path), "--max_steps", "16", "--learning_rate", "3e-2",
                    "--reward_funcs", "test_corner_brightness", "--monitor_reward_funcs", "test_corner_darkness",
                    "--monitor_prompts", *HELD_OUT, "--monitor_seeds", "2", "--eval_strategy", "steps",
                    "--eval_steps", "2", "--early_stop_patience", "2", "--disable_tqdm", "true"])
    history = _history(tmp_path)
    evals = [h for h in history if "eval_reward" in h]
    print("held-out (darkness):", [(h["step"], round(h["eval_reward"], 4), h["eval_overopt_falling"]) for h in evals])
    assert any(h["eval_overopt_flag"] == 1.0 for h in evals)
    assert evals[-1]["eval_overopt_falling"] >= 2
    assert trainer.state.global_step < 16  # stopped early
    best = max(evals, key=lambda h: h["eval_reward"])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    final = load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    kept = load_file(Path(trainer.state.best_model_checkpoint) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in final)
