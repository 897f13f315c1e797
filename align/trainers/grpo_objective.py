"""Flow-GRPO as one policy objective over the objective-neutral online-RL package (``align/rl``), driven by
``GRPOTrainer`` and the combined trainer alike:

- ``GRPOArguments`` (``align/configs/grpo.py``): the GRPO hyper-parameters, a dataclass mixin for any trainer config;
- ``GRPOObjective``: SDE rollouts + scoring + group advantages across processes (its ``rollout`` feeds an
  ``align.rl.source.RolloutSource``), and the policy loss (clip / guard / dppo, + closed-form KL) on a buffered
  rollout batch, back-propagated one trained timestep at a time.

Every random choice (initial and SDE noise of each sample, the SDE window, the trained timesteps) is a function
of the run seed and a counter (``align.rl.seeds``): a resumed run draws the same numbers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from qwen_image import QwenImage
from qwen_image.sampling import sde_step

from ..data.grpo import reference_area
from ..losses.grpo import (
    dppo_loss,
    gaussian_kl,
    grpo_clip_loss,
    grpo_guard_loss,
    num_train_timesteps,
    sde_window_for,
)
from ..rl.backward import PerTimestepBackward
from ..rl.monitor import group_diversity
from ..rl.rollouts import RolloutBatch, generate_rollouts, recompute_log_prob
from ..rl.scoring import GroupScoring
from ..rl.seeds import TRAIN_STEPS, WINDOW, derived_generator, sample_seeds
from .base import MetricLog

logger = logging.getLogger(__name__)


class GRPOObjective(PerTimestepBackward, GroupScoring):
    """Rollouts + Flow-GRPO loss for one policy.

    ``rollout(policy, prompts, columns, index)`` samples the local prompts in micro-batches of
    ``args.rollout_batch_size``, scores them, gathers the rewards of every process to form groups, and returns the
    micro-batches with advantages. ``backward(model, batch, ...)`` recomputes the log-probs of a random
    ``timestep_fraction`` of the SDE steps and back-propagates the clipped policy loss (+ KL to ``reference`` when
    ``need_kl``) ONE TIMESTEP AT A TIME, each scaled by 1 / (number of trained steps): the gradient equals that of
    the mean over the steps (``loss``, kept for DeepSpeed and for tests), while autograd holds one timestep's graph
    at a time instead of all of them. Metrics go to ``self.metrics`` (a ``MetricLog``: averaged across ranks).
    """

    def __init__(self, qwen: QwenImage, args: Any, reward_fn, accelerator, reference=None, need_kl: bool = False):
        self.qwen = qwen
        self.args = args
        self.reward_fn = reward_fn
        self.accelerator = accelerator
        self.reference = reference
        self.need_kl = need_kl
        if need_kl and reference is None:
            raise ValueError("a KL term needs the frozen reference model")
        self.metrics = MetricLog(accelerator)
        self.logged_images: list[tuple[Any, str]] = []
        self.num_rollouts = 0
        self.rollout_seconds = 0.0
        if need_kl:
            logger.info("GRPO KL form: %s (%s)", args.kl_form,
                        "mean over dims, no 1/|dt|: flow_grpo's betas transfer" if args.kl_form == "flow_grpo"
                        else "true KL of the step, sum over dims / |dt|")

    @property
    def kl_metric(self) -> str:
        return f"kl/{self.args.kl_form}"

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollout(self, policy: torch.nn.Module, prompts: list[str], columns: dict[str, list] | None = None,
                index: int = 0) -> list[RolloutBatch]:
        """Roll out this process's share of generation batch number ``index``.

        Sample ``i`` of this process is global sample ``rank * len(prompts) + i`` of the batch; its seed (initial
        and SDE noise) is a function of (run seed, ``index``, global sample index) alone.
        """
        args = self.args
        start = time.perf_counter()
        was_training = policy.training
        policy.eval()
        window_gen = derived_generator(args.seed, WINDOW, index)  # same on every rank: groups share a window
        window = sde_window_for(args.num_inference_steps, args.sde_window_size, args.sde_window_range, window_gen)
        columns = {k: list(v) for k, v in (columns or {}).items() if k != "prompt"}
        first = self.accelerator.process_index * len(prompts)
        seeds = sample_seeds(args.seed, index, first, len(prompts))
        size = args.resolution
        chunks: list[RolloutBatch] = []
        local_totals: list[float | None] = []
        local_per: dict[str, list] = {}
        bs = args.rollout_batch_size
        for i in range(0, len(prompts), bs):
            sl = slice(i, i + bs)
            batch = generate_rollouts(
                self.qwen, policy, prompts[sl], {k: v[sl] for k, v in columns.items()}, height=size, width=size,
                num_inference_steps=args.num_inference_steps, noise_level=args.noise_level, sde_window=window,
                true_cfg_scale=args.true_cfg_scale, negative_prompt=args.negative_prompt, seeds=seeds[sl],
                keep_means=args.policy_loss != "clip", reference_area=reference_area(args),
            )
            self._score(batch, local_totals, local_per)
            chunks.append(batch)
        policy.train(was_training)
        self._set_advantages(chunks, local_totals, local_per)
        self.metrics.add({"group_diversity": group_diversity(chunks)})
        elapsed = time.perf_counter() - start
        self.rollout_seconds += elapsed
        self.num_rollouts += len(prompts)
        self.metrics.add({"rollouts_per_s": len(prompts) / max(elapsed, 1e-9),
                          "sde_window_start": None if window is None else float(window[0])})
        self._keep_images(chunks)
        return chunks

    # ------------------------------------------------------------------ loss
    def train_steps(self, batch: RolloutBatch, micro_step: int = 0) -> list[int]:
        """A random ``timestep_fraction`` of the batch's SDE steps (flow_grpo shuffles the steps per batch), drawn from
        (run seed, rank, ``micro_step``)."""
        k = num_train_timesteps(len(batch.sde_steps), self.args.timestep_fraction)
        gen = derived_generator(self.args.seed, TRAIN_STEPS, self.accelerator.process_index, micro_step)
        order = torch.randperm(len(batch.sde_steps), generator=gen)[:k]
        return sorted(batch.sde_steps[i] for i in order.tolist())

    def step_terms(self, model: torch.nn.Module, batch: RolloutBatch, j: int) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Policy loss, KL (or None) and ratio statistics of trained step ``j`` (``batch`` already on the device)."""
        args = self.args
        step = recompute_log_prob(model, batch, j, velocity_fn=self.qwen.predict_velocity)
        old = batch.log_probs[:, j]
        if args.policy_loss == "clip":
            policy_loss, stats = grpo_clip_loss(step.log_prob, old, batch.advantages, args.epsilon)
        else:
            if batch.means is None:
                raise RuntimeError(f"policy_loss={args.policy_loss} needs the rollout's step means (keep_means)")
            stabilised = grpo_guard_loss if args.policy_loss == "guard" else dppo_loss
            extra = ({"reweight": args.guard_reweight} if args.policy_loss == "guard"
                     else {"trust_region_form": args.trust_region_form})
            policy_loss, stats = stabilised(step.log_prob, old, batch.advantages, args.epsilon, step.mean,
                                            batch.means[:, j], batch.std_dev_t(j), batch.step_dt(j), **extra)
        kl = self._kl(batch, j, step.mean).mean() if self.need_kl else None
        return policy_loss, kl, stats

    # the hooks of PerTimestepBackward: the trained SDE steps are its timesteps
    def trained_timesteps(self, batch: RolloutBatch, micro_step: int) -> list[int]:
        return self.train_steps(batch, micro_step)

    def timestep_terms(self, model: torch.nn.Module, batch: RolloutBatch,
                       j: int) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        return self.step_terms(model, batch, j)

    def _on_device(self, batch: RolloutBatch) -> RolloutBatch:
        device = self.accelerator.device
        batch = batch.to(device)
        batch.advantages = batch.advantages.to(device)
        batch.log_probs = batch.log_probs.to(device)
        return batch

    def _record(self, stats: list[dict], policy_loss: float, kl: float | None) -> None:
        n = len(stats)
        m = {
            "ratio/mean": sum(s["ratio_mean"] for s in stats) / n,
            "ratio/min": min(s["ratio_min"] for s in stats),
            "ratio/max": max(s["ratio_max"] for s in stats),
            "clip_fraction": sum(s["clip_fraction"] for s in stats) / n,
            "policy_loss": policy_loss,
        }
        for key in ("ratio_bias_mean", "trust_kl_mean", "trust_kl_max"):  # guard / dppo statistics
            if key in stats[0]:
                name = key.replace("trust_kl_", "trust_kl/")
                m[name] = max(s[key] for s in stats) if key.endswith("max") else sum(s[key] for s in stats) / n
        if kl is not None:
            m[self.kl_metric] = kl
        self.metrics.add(m)

    def _kl(self, batch: RolloutBatch, j: int, mean: torch.Tensor) -> torch.Tensor:
        x = batch.x(j)
        v_ref = self.reference.velocity(x, batch.sigmas[j], batch.cond, batch.img_shapes, batch.negative,
                                        batch.true_cfg_scale)
        ref = sde_step(x, v_ref, float(batch.sigmas[j]), float(batch.sigmas[j + 1]), batch.noise_level,
                       batch.sigma_max, prev_sample=batch.x(j + 1))
        return gaussian_kl(mean, ref.mean.detach(), batch.std_dev_t(j).to(mean.device), batch.step_dt(j),
                           self.args.kl_form)

    def pop_metrics(self) -> dict[str, float]:
        """Averages of the collected metrics since the last call (across ranks and micro-steps)."""
        return self.metrics.pop()
