"""Over-optimisation monitors for every online objective: what RL users look at after reward hacking and collapse.

Every ``eval_steps`` (the Trainer's own evaluation schedule) ``HeldOutMonitor`` renders held-out prompts with the
deterministic ODE sampler at fixed seeds and reports:

- ``eval_reward`` (+ ``eval_rewards/<name>``): the held-out reward, by default the trained reward, or any other
  (``monitor_reward_funcs``: a judge the policy is not optimised against sees hacking first);
- ``eval_diversity``: mean pairwise RMS distance (pixels in [0, 1], 64 px grey thumbnails) between the images of
  one prompt across seeds - collapse drives it to 0;
- ``eval_kl_ref``: ``mean ||v - v_ref||^2`` between policy and reference velocities on the held-out images noised to
  sigma 0.5 (the velocity-form KL of the DPO term; LoRA: reference = adapters off, free);
- ``eval_overopt_falling``: for how many evaluations in a row the held-out reward fell while the training reward
  rose since the first of them; ``eval_overopt_flag`` is 1 when that count is >= 1.

With ``early_stop_patience: N`` the run stops once that count reaches N, and the checkpoint with the best held-out
reward is loaded before the final save (``load_best_model_at_end`` on ``eval_reward``, set automatically).

Both run as ``transformers.TrainerCallback``s on the Trainer's ``on_evaluate`` (:class:`HeldOutMonitorCallback`,
:class:`OverOptimizationEarlyStopping`, added by :func:`add_monitor_callbacks`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from qwen_image.sampling import sample

from ..data.grpo import reference_area
from .rollouts import RolloutBatch, rollout_conditioning, score_images

logger = logging.getLogger(__name__)

MONITOR_SEED_BASE = 1_000_003  # held-out seeds: far from the rollout seeds drawn from the run seed


def thumbnail(image, size: int = 64) -> np.ndarray:
    """A small grey copy in [0, 1] for distances between images."""
    return np.asarray(image.convert("L").resize((size, size)), dtype=np.float32) / 255.0


def mean_pairwise_rms(arrays: list[np.ndarray]) -> float:
    """Mean RMS distance over all pairs (NaN for fewer than two)."""
    if len(arrays) < 2:
        return math.nan
    d = [float(np.sqrt(np.mean((a - b) ** 2))) for i, a in enumerate(arrays) for b in arrays[i + 1:]]
    return sum(d) / len(d)


def group_diversity(chunks: list[RolloutBatch]) -> float:
    """Mean pairwise RMS distance between this process's rollouts of the same prompt (64 px grey thumbnails in
    [0, 1]); NaN when no prompt has two images here. A collapsing policy drives it to 0."""
    by_prompt: dict[str, list] = {}
    for batch in chunks:
        for p, im in zip(batch.prompts, batch.images):
            by_prompt.setdefault(p, []).append(thumbnail(im))
    values = [d for d in (mean_pairwise_rms(t) for t in by_prompt.values()) if not math.isnan(d)]
    return sum(values) / len(values) if values else math.nan


class HeldOutMonitor:
    """Held-out reward, diversity and KL to the reference of the current policy (see the module docstring)."""

    def __init__(self, qwen, args: Any, prompts, reward_fn, accelerator, reference=None):
        self.qwen = qwen
        self.args = args
        self.reward_fn = reward_fn
        self.accelerator = accelerator
        self.reference = reference
        self.rows = [prompts[i] for i in range(len(prompts))]
        self.items = [(i, MONITOR_SEED_BASE + k) for i in range(len(self.rows)) for k in range(args.monitor_seeds)]

    @torch.no_grad()
    def evaluate(self, policy: torch.nn.Module) -> dict[str, float]:
        from accelerate.utils import gather_object

        args = self.args
        was_training = policy.training
        policy.eval()
        device = self.accelerator.device
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = self.items[rank::world]
        size = args.resolution
        steps = args.monitor_num_inference_steps or args.num_inference_steps
        sigmas = self.qwen.inference_sigmas(steps, size, size)
        results = []
        for start in range(0, len(mine), args.rollout_batch_size):
            chunk = mine[start:start + args.rollout_batch_size]
            rows = [self.rows[i] for i, _ in chunk]
            prompts = [r["prompt"] for r in rows]
            columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
            cond, negative = rollout_conditioning(self.qwen, prompts, columns, args.true_cfg_scale,
                                                  args.negative_prompt, reference_area(args), device)
            latents = self.qwen.initial_noise(len(chunk), size, size, [s for _, s in chunk]).to(device)
            shapes = self.qwen.img_shapes(len(chunk), size, size)
            out = sample(policy, latents, sigmas, cond, shapes, negative=negative, true_cfg_scale=args.true_cfg_scale,
                         velocity_fn=self.qwen.predict_velocity)
            images = self.qwen.decode_latents(out.latents, size, size)
            totals, per = score_images(self.reward_fn, prompts, images, columns)
            kl = self._kl_ref(policy, out.latents, cond, shapes, [s for _, s in chunk])
            for n, (i, _) in enumerate(chunk):
                results.append({"prompt": i, "reward": totals[n], "per": {k: v[n] for k, v in per.items()},
                                "thumb": thumbnail(images[n]), "kl": None if kl is None else float(kl[n])})
        policy.train(was_training)
        every = gather_object(results)
        return self._summarise(every)

    def _kl_ref(self, policy, x0: torch.Tensor, cond, shapes, seeds) -> torch.Tensor | None:
        if self.reference is None:
            return None
        g = torch.Generator().manual_seed(int(seeds[0]))
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(x0.device)
        sigma = 0.5
        noisy = ((1 - sigma) * x0.float() + sigma * noise).to(x0.dtype)
        v = self.qwen.predict_velocity(policy, noisy, torch.tensor(sigma), cond, shapes)
        v_ref = self.reference.velocity(noisy, torch.tensor(sigma), cond, shapes)
        diff2 = (v.float() - v_ref.float()) ** 2
        return diff2.mean(dim=tuple(range(1, diff2.dim()))).cpu()

    def _summarise(self, results: list[dict]) -> dict[str, float]:
        def mean(values) -> float:
            vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
            return sum(vals) / len(vals) if vals else math.nan

        out = {"reward": mean(r["reward"] for r in results)}
        for name in results[0]["per"] if results else []:
            out[f"rewards/{name}"] = mean(r["per"][name] for r in results)
        by_prompt: dict[int, list[np.ndarray]] = {}
        for r in results:
            by_prompt.setdefault(r["prompt"], []).append(r["thumb"])
        out["diversity"] = mean(mean_pairwise_rms(t) for t in by_prompt.values())
        if self.reference is not None:
            out["kl_ref"] = mean(r["kl"] for r in results)
        return out


def build_monitor(qwen, args: Any, prompts, accelerator, policy, reference=None):
    """The held-out monitor and its guard (None, None without held-out prompts). Without a KL reference a LoRA
    policy still gets one for the KL monitor: the same weights with the adapters off (no memory)."""
    from ..reference import ReferenceModel
    from .rewards import build_reward

    if prompts is None:
        return None, None
    if reference is None and args.finetune == "lora":
        reference = ReferenceModel.from_policy(policy, "lora", args.init_adapter, velocity_fn=qwen.predict_velocity)
    reward = build_reward(args, args.monitor_reward_funcs or None, watch_signal=False)
    return (HeldOutMonitor(qwen, args, prompts, reward, accelerator, reference),
            OverOptimizationGuard(args.early_stop_patience))


class OverOptimizationGuard:
    """Counts evaluations in a row where the held-out reward fell while the training reward rose."""

    def __init__(self, patience: int):
        self.patience = patience
        self.history: list[tuple[float, float]] = []  # (held-out reward, training reward) per evaluation

    def update(self, held_out: float, training: float) -> int:
        self.history.append((held_out, training))
        falling = 0
        for k in range(len(self.history) - 1, 0, -1):
            if self.history[k][0] < self.history[k - 1][0]:
                falling += 1
            else:
                break
        if falling and not self.history[-1][1] > self.history[-1 - falling][1]:
            falling = 0  # the training reward did not rise over the same evaluations: not over-optimisation
        return falling

    def should_stop(self, falling: int) -> bool:
        return self.patience > 0 and falling >= self.patience


def training_reward_since(log_history: list[dict], key: str, after_step: int) -> float:
    """Mean training reward logged after ``after_step`` (the previous evaluation): one step's rollout mean is noisy,
    the mean since the last evaluation is the trend the guard compares. The latest value when none is newer."""
    values = [float(e[key]) for e in log_history if key in e and e.get("step", 0) > after_step]
    if values:
        return sum(values) / len(values)
    older = [float(e[key]) for e in log_history if key in e]
    return older[-1] if older else math.nan


class HeldOutMonitorCallback(TrainerCallback):
    """At every evaluation of the Trainer's schedule: the held-out monitor's metrics (``eval_reward``,
    ``eval_rewards/<name>``, ``eval_diversity``, ``eval_kl_ref``) and the over-optimisation count
    (``eval_overopt_falling``, ``eval_overopt_flag``), logged and added to the evaluation's metrics, where the
    Trainer's best-model tracking (``metric_for_best_model: eval_reward``) and the early stop read them.

    Like TRL's callbacks it holds its trainer: the policy to render, ``log`` and ``training_reward_key`` (the logged
    rollout reward whose trend since the previous evaluation the guard compares with the held-out reward)."""

    def __init__(self, trainer, monitor: HeldOutMonitor, guard: OverOptimizationGuard, prefix: str = "eval"):
        self.trainer = trainer
        self.monitor = monitor
        self.guard = guard
        self.prefix = prefix
        self.last_eval_step = -1

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        trainer, p = self.trainer, self.prefix
        held = self.monitor.evaluate(trainer.accelerator.unwrap_model(trainer.model))
        held = {f"{p}_{k}": v for k, v in held.items()}
        train_reward = training_reward_since(state.log_history, trainer.training_reward_key, self.last_eval_step)
        self.last_eval_step = state.global_step
        falling = self.guard.update(held[f"{p}_reward"], train_reward)
        held[f"{p}_overopt_falling"] = float(falling)
        held[f"{p}_overopt_flag"] = float(falling >= 1)
        trainer.log(held)
        if falling:
            logger.warning("held-out reward fell %d evaluation(s) in a row (%.4f) while the training reward rose "
                           "(%.4f): possible reward over-optimisation", falling, held[f"{p}_reward"], train_reward)
        if metrics is not None:
            metrics.update(held)


class OverOptimizationEarlyStopping(TrainerCallback):
    """Stops training once the held-out reward fell ``patience`` evaluations in a row while the training reward
    rose (``eval_overopt_falling``, from :class:`HeldOutMonitorCallback`), as transformers' EarlyStoppingCallback
    does on a metric; the best held-out checkpoint is then loaded before the final save (``load_best_model_at_end``,
    set by the config)."""

    def __init__(self, guard: OverOptimizationGuard, prefix: str = "eval"):
        self.guard = guard
        self.prefix = prefix

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        falling = (metrics or {}).get(f"{self.prefix}_overopt_falling")
        if falling is None or not self.guard.should_stop(int(falling)):
            return
        logger.warning("early stop: held-out reward fell %d evaluations in a row while the training reward rose; "
                       "the best checkpoint (held-out reward %s) is kept", int(falling), state.best_metric)
        control.should_training_stop = True


def add_monitor_callbacks(trainer, monitor: HeldOutMonitor | None, guard: OverOptimizationGuard | None) -> None:
    """The held-out monitor and (``early_stop_patience > 0``) its early stop as the trainer's first callbacks, so
    that every other callback's ``on_evaluate`` (a user's EarlyStoppingCallback on ``eval_reward``, a logger
    keeping the best checkpoint) sees the monitor's metrics. Nothing without held-out prompts."""
    if monitor is None:
        return
    callbacks = [HeldOutMonitorCallback(trainer, monitor, guard)]
    if guard.patience > 0:
        callbacks.append(OverOptimizationEarlyStopping(guard))
    trainer.callback_handler.callbacks[0:0] = callbacks


class MonitoredEvaluationMixin:
    """``evaluate`` for the online trainers, whose held-out monitor lives in callbacks (:func:`add_monitor_callbacks`).

    The override stays because the Trainer's ``evaluate`` always runs its loss loop over ``eval_dataset``: an
    online trainer has no loss to evaluate (its ``eval_dataset`` holds the held-out prompts only so that the
    Trainer schedules evaluations), so without a parent evaluation (the combined trainer's held-out pairs) it
    skips the loop and only dispatches ``on_evaluate``. The metrics the callbacks add are returned, which is where
    the Trainer's best-model tracking reads ``eval_reward``."""

    monitor: HeldOutMonitor | None = None  # set by the trainer (None without held-out prompts)
    guard: OverOptimizationGuard | None = None
    training_reward_key = "reward"
    parent_evaluates = False

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if self.parent_evaluates:  # its on_evaluate runs the monitor's callbacks on the same metrics
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # type: ignore[misc]
        metrics: dict[str, float] = {}
        if self.monitor is None:
            return metrics
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)  # type: ignore[attr-defined]
        return metrics
