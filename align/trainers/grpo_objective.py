"""Flow-GRPO as a reusable piece, driven by ``GRPOTrainer`` and the combined DPO+GRPO trainer alike:

- ``GRPOArguments`` (``align/configs/grpo.py``): the GRPO hyper-parameters, a dataclass mixin for any trainer config;
- ``GRPOObjective``: rollout generation + scoring + group advantages across processes, and the clipped-ratio loss
  (+ closed-form KL) on a buffered rollout batch, back-propagated one trained timestep at a time;
- ``RolloutSource``: the prompt stream, the rollout buffer and the micro-step counter - everything a checkpoint
  must hold for a resumed run to continue exactly (``state_dict`` / ``load_state_dict``).

Every random choice (initial and SDE noise of each sample, the SDE window, the trained timesteps) is a function
of the run seed and a counter (rollout number, global sample index, micro-step), not of a generator's hidden state:
a resumed run draws the same numbers, and a sample's noise does not depend on how many processes share the batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any, Callable

import torch
from trl.trainer.utils import RepeatSampler

from qwen_image import QwenImage
from qwen_image.errors import UserError
from qwen_image.sampling import sde_step

from ..configs.grpo import GRPOArguments
from ..data.grpo import check_edit_prompt_sizes, reference_area
from ..data.prompts import collate_prompts
from ..losses.grpo import (
    dppo_loss,
    gaussian_kl,
    group_advantages,
    grpo_clip_loss,
    grpo_guard_loss,
    num_train_timesteps,
    rewards_tensor,
)
from ..rollouts import RolloutBatch, generate_rollouts, recompute_log_prob, score_images, sde_window_for
from .base import MetricLog

logger = logging.getLogger(__name__)


def precompute_prompts_and_release(qwen, args: GRPOArguments, prompts, held_out, device) -> None:
    """With ``release_text_encoder``: encode the finite prompt sets (training ``prompts``, ``held_out`` or None)
    once (edit models: each row with its control images, and the CFG negative with them), then drop the text
    encoder; otherwise move it to ``device`` (rollouts encode their prompts as they come)."""
    from .base import release_text_encoder

    datasets = [ds for ds in (prompts, held_out) if ds is not None]
    qwen.text_encoder.to(device)
    check_edit_prompt_sizes(qwen, args, prompts, held_out)
    if not args.release_text_encoder:
        return
    if qwen.edit_model:
        from ..data.edit import CONTROLS
        from ..rollouts import control_images

        count = 0
        for ds in datasets:
            for start in range(0, len(ds), 64):  # a chunk of rows' images in memory at a time
                rows = ds.select_columns(["prompt", CONTROLS])[start:start + 64]
                texts, images = list(rows["prompt"]), control_images(qwen, rows, len(rows["prompt"]))
                if args.true_cfg_scale > 1 and args.negative_prompt is not None:  # the negative reads the images too
                    texts, images = texts + [args.negative_prompt] * len(images), images + images
                count += qwen.edit_encoder.precompute(texts, images)
    else:
        count = qwen.prompt_encoder.precompute([p for ds in datasets for p in ds["prompt"]] + [args.negative_prompt],
                                               progress=True)
    release_text_encoder(qwen)
    logger.info("encoded %d distinct prompts once; text encoder released", count)


def build_reward(args: GRPOArguments, funcs: list[str] | None = None, weights: list[float] | None = None):
    """The configured reward: one registry reward, or a weighted ``rewards.CombinedReward`` (logs each part).
    ``funcs``/``weights`` name another set (the held-out monitor's); ``reward_kwargs`` apply to both."""
    from rewards import combine

    funcs = list(args.reward_funcs if funcs is None else funcs)
    weights = args.reward_weights if funcs == list(args.reward_funcs) and weights is None else weights
    if not funcs:
        raise UserError("reward_funcs is empty: name at least one reward (see rewards.available_rewards()).")
    kwargs = args.reward_kwargs or {}
    unknown = set(kwargs) - set(args.reward_funcs) - set(args.monitor_reward_funcs or [])
    if unknown:
        raise UserError(f"reward_kwargs for rewards not in reward_funcs: {sorted(unknown)}")
    try:
        return combine(funcs, weights, reward_kwargs={k: v for k, v in kwargs.items() if k in funcs})
    except KeyError as err:
        raise UserError(str(err).strip("'\"")) from None


def build_monitor(qwen, args: GRPOArguments, prompts, accelerator, policy, reference=None):
    """The held-out monitor and its guard (None, None without held-out prompts). Without a KL reference a LoRA
    policy still gets one for the KL monitor: the same weights with the adapters off (no memory)."""
    from ..reference import ReferenceModel
    from .monitor import HeldOutMonitor, OverOptimizationGuard

    if prompts is None:
        return None, None
    if reference is None and args.finetune == "lora":  # type: ignore[attr-defined]
        reference = ReferenceModel.from_policy(policy, "lora", args.init_adapter)  # type: ignore[attr-defined]
    reward = build_reward(args, args.monitor_reward_funcs) if args.monitor_reward_funcs else build_reward(args)
    return (HeldOutMonitor(qwen, args, prompts, reward, accelerator, reference),
            OverOptimizationGuard(args.early_stop_patience))


def derived_generator(*indices: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (run seed, purpose, counters): the same tuple, the same draws."""
    h = 0x9E3779B97F4A7C15
    for v in indices:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator("cpu").manual_seed(h & 0x7FFFFFFFFFFFFFFF)


def group_diversity(chunks: list[RolloutBatch]) -> float:
    """Mean pairwise RMS distance between this process's rollouts of the same prompt (64 px grey thumbnails in
    [0, 1]); NaN when no prompt has two images here. A collapsing policy drives it to 0."""
    from .monitor import mean_pairwise_rms, thumbnail

    by_prompt: dict[str, list] = {}
    for batch in chunks:
        for p, im in zip(batch.prompts, batch.images):
            by_prompt.setdefault(p, []).append(thumbnail(im))
    values = [d for d in (mean_pairwise_rms(t) for t in by_prompt.values()) if not math.isnan(d)]
    return sum(values) / len(values) if values else math.nan


# "purpose" tags of derived_generator: one stream each
_SEEDS, _WINDOW, _TRAIN_STEPS = 1, 2, 3


class GRPOObjective:
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
        window_gen = derived_generator(args.seed, _WINDOW, index)  # same on every rank: groups share a window
        window = sde_window_for(args.num_inference_steps, args.sde_window_size, args.sde_window_range, window_gen)
        columns = {k: list(v) for k, v in (columns or {}).items() if k != "prompt"}
        first = self.accelerator.process_index * len(prompts)
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=derived_generator(args.seed, _SEEDS, index, first + i)))
                 for i in range(len(prompts))]
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
            totals, per = score_images(self.reward_fn, batch.prompts, batch.images, batch.columns)
            batch.rewards = rewards_tensor(totals)
            batch.rewards_per_func = per
            local_totals += totals
            for k, v in per.items():
                local_per.setdefault(k, []).extend(v)
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

    def _set_advantages(self, chunks: list[RolloutBatch], local_totals: list, local_per: dict[str, list]) -> None:
        from accelerate.utils import gather_object

        # Groups can straddle processes (RepeatSampler lays them out consecutively over the global batch): gather
        # every process's rewards in rank order, compute the advantages globally, keep this process's slice.
        all_totals = gather_object(list(local_totals))
        rewards = rewards_tensor(all_totals)
        adv = group_advantages(rewards, self.args.num_generations, self.args.scale_mode, self.args.adv_clip_max)
        rank, n = self.accelerator.process_index, len(local_totals)
        local_adv = adv[rank * n:(rank + 1) * n]
        offset = 0
        for batch in chunks:
            batch.advantages = local_adv[offset:offset + len(batch)].clone()
            offset += len(batch)
        self._log_rewards(rewards, adv, {k: gather_object(list(v)) for k, v in local_per.items()})

    def _log_rewards(self, rewards: torch.Tensor, adv: torch.Tensor, per: dict[str, list]) -> None:
        """Statistics of the GLOBAL generation batch (identical on every rank)."""
        def stats(t: torch.Tensor) -> tuple[float, float]:
            t = t[~torch.isnan(t)]
            return (float(t.mean()) if t.numel() else math.nan,
                    float(t.std(unbiased=False)) if t.numel() > 1 else math.nan)

        m: dict[str, float] = {}
        m["reward"], m["reward_std"] = stats(rewards)
        for name, vals in per.items():
            m[f"rewards/{name}/mean"], m[f"rewards/{name}/std"] = stats(rewards_tensor(vals))
        groups = rewards.view(-1, self.args.num_generations)
        zero_std = [(g[~torch.isnan(g)].std(unbiased=False) if (~torch.isnan(g)).sum() > 1 else torch.tensor(0.0)) < 1e-8
                    for g in groups]
        m["frac_reward_zero_std"] = float(sum(bool(z) for z in zero_std)) / len(zero_std)
        m["advantages/abs_mean"] = float(adv.abs().mean())
        m["advantages/max"] = float(adv.max())
        m["advantages/min"] = float(adv.min())
        self.metrics.add(m)

    def _keep_images(self, chunks: list[RolloutBatch]) -> None:
        if not self.args.num_images_to_log or not self.accelerator.is_main_process:
            return
        images = []
        for batch in chunks:
            for i, (im, p) in enumerate(zip(batch.images, batch.prompts)):
                r = float(batch.rewards[i])
                images.append((im, f"{p[:60]} | r={r:.3f} | A={float(batch.advantages[i]):+.2f}"))
        self.logged_images = images[: self.args.num_images_to_log]

    # ------------------------------------------------------------------ loss
    def train_steps(self, batch: RolloutBatch, micro_step: int = 0) -> list[int]:
        """A random ``timestep_fraction`` of the batch's SDE steps (flow_grpo shuffles the steps per batch), drawn from
        (run seed, rank, ``micro_step``)."""
        k = num_train_timesteps(len(batch.sde_steps), self.args.timestep_fraction)
        gen = derived_generator(self.args.seed, _TRAIN_STEPS, self.accelerator.process_index, micro_step)
        order = torch.randperm(len(batch.sde_steps), generator=gen)[:k]
        return sorted(batch.sde_steps[i] for i in order.tolist())

    def step_terms(self, model: torch.nn.Module, batch: RolloutBatch, j: int) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Policy loss, KL (or None) and ratio statistics of trained step ``j`` (``batch`` already on the device)."""
        args = self.args
        step = recompute_log_prob(model, batch, j)
        old = batch.log_probs[:, j]
        if args.policy_loss == "clip":
            policy_loss, stats = grpo_clip_loss(step.log_prob, old, batch.advantages, args.epsilon)
        else:
            if batch.means is None:
                raise RuntimeError(f"policy_loss={args.policy_loss} needs the rollout's step means (keep_means)")
            stabilised = grpo_guard_loss if args.policy_loss == "guard" else dppo_loss
            extra = {"reweight": args.guard_reweight} if args.policy_loss == "guard" else {"kl_form": args.kl_form}
            policy_loss, stats = stabilised(step.log_prob, old, batch.advantages, args.epsilon, step.mean,
                                            batch.means[:, j], batch.std_dev_t(j), batch.step_dt(j), **extra)
        kl = self._kl(batch, j, step.mean).mean() if self.need_kl else None
        return policy_loss, kl, stats

    def loss(self, model: torch.nn.Module, batch: RolloutBatch, steps: list[int] | None = None,
             micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(policy loss, KL or None), each averaged over the trained steps, as ONE graph (all steps' activations
        live until backward). Training uses ``backward``; this form serves DeepSpeed and the tests."""
        batch = self._on_device(batch)
        steps = self.train_steps(batch, micro_step) if steps is None else steps
        policy_losses, kls, stats = [], [], []
        for j in steps:
            pl, kl, st = self.step_terms(model, batch, j)
            policy_losses.append(pl)
            stats.append(st)
            if kl is not None:
                kls.append(kl)
        policy_loss = torch.stack(policy_losses).mean()
        kl = torch.stack(kls).mean() if kls else None
        self._record_step_stats(stats, float(policy_loss.detach()), None if kl is None else float(kl.detach()))
        return policy_loss, kl

    def backward(
        self,
        model: torch.nn.Module,
        batch: RolloutBatch,
        backward: Callable[[torch.Tensor], None],
        *,
        policy_weight: float = 1.0,
        kl_weight: float = 0.0,
        scale: float = 1.0,
        no_sync: Callable[[], Any] = contextlib.nullcontext,
        micro_step: int = 0,
    ) -> float:
        """Back-propagate ``scale * (policy_weight * L_policy + kl_weight * KL)`` (both means over the trained steps)
        one trained timestep at a time; returns the value of the weighted loss (unscaled).

        ``backward`` is the accelerator's; every timestep but the last runs under ``no_sync()`` (DDP / FSDP then
        reduce the accumulated gradient once). Peak activation memory is one timestep's, whatever the step count.
        """
        batch = self._on_device(batch)
        steps = self.train_steps(batch, micro_step)
        n = len(steps)
        total, policy_sum, kl_sum, stats = 0.0, 0.0, 0.0, []
        for idx, j in enumerate(steps):
            with no_sync() if idx < n - 1 else contextlib.nullcontext():
                pl, kl, st = self.step_terms(model, batch, j)
                loss_j = policy_weight * pl + (kl_weight * kl if kl is not None else 0.0)
                backward(loss_j * (scale / n))
            total += float(loss_j.detach()) / n
            policy_sum += float(pl.detach()) / n
            if kl is not None:
                kl_sum += float(kl.detach()) / n
            stats.append(st)
        self._record_step_stats(stats, policy_sum, kl_sum if self.need_kl else None)
        return total

    def _on_device(self, batch: RolloutBatch) -> RolloutBatch:
        device = self.accelerator.device
        batch = batch.to(device)
        batch.advantages = batch.advantages.to(device)
        batch.log_probs = batch.log_probs.to(device)
        return batch

    def _record_step_stats(self, stats: list[dict], policy_loss: float, kl: float | None) -> None:
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


class PromptStream:
    """Endless generation batches of prompts for this process, laid out as TRL's RepeatSampler lays them over
    processes (same seed everywhere; each rank takes its slice), so groups are whole across the gather. Its state
    is the number of indices drawn: a restored stream replays the sampler to that point."""

    def __init__(self, dataset, args: GRPOArguments, process_index: int):
        self.dataset = dataset
        self.global_size = args.generation_batch_size
        self.local_size = self.global_size // args.world_size  # type: ignore[attr-defined]
        self.rank = process_index
        unique = self.global_size // args.num_generations
        if len(dataset) < unique:
            raise ValueError(f"the prompt set has {len(dataset)} prompts; a generation batch needs {unique} distinct ones.")
        self._sampler_args = dict(mini_repeat_count=args.num_generations, batch_size=unique, repeat_count=1,
                                  shuffle=True, seed=args.seed)
        self._restart()

    def _restart(self) -> None:
        self.sampler = RepeatSampler(self.dataset, **self._sampler_args)
        self._iter = iter(self.sampler)
        self.drawn = 0

    def _take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            try:
                out.append(next(self._iter))
            except StopIteration:  # a new epoch over the prompts (RepeatSampler reshuffles)
                self._iter = iter(self.sampler)
        self.drawn += n
        return out

    def next(self) -> dict[str, list]:
        idx = self._take(self.global_size)[self.rank * self.local_size:(self.rank + 1) * self.local_size]
        return collate_prompts([self.dataset[i] for i in idx])

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restart()
        self._take(int(state["drawn"]))


class RolloutSource:
    """The rollout side of a GRPO run: which buffered micro-batch each micro-step trains on and when to roll out
    anew (every ``steps_per_generation * num_iterations`` micro-steps, TRL's layout), the prompt stream and the
    buffer. Both GRPO trainers use it; ``state_dict`` goes into every checkpoint, so a resumed run trains on the
    same rollouts in the same order as an uninterrupted one."""

    def __init__(self, objective: GRPOObjective, prompts, args: GRPOArguments, process_index: int):
        self.objective = objective
        self.args = args
        self.prompts = PromptStream(prompts, args, process_index)
        self.micro_step = 0  # micro-steps trained so far
        self.rollout_index = 0  # generation batches rolled out so far
        self.buffer: list[RolloutBatch] | None = None

    def batch(self, policy: torch.nn.Module) -> RolloutBatch:
        """The micro-batch of the current micro-step (rolling out a new buffer when one is due)."""
        every = self.args.steps_per_generation * self.args.num_iterations
        if self.micro_step % every == 0 or self.buffer is None:
            generation = self.prompts.next()
            self.buffer = self.objective.rollout(policy, list(generation["prompt"]), generation, self.rollout_index)
            self.rollout_index += 1
            if len(self.buffer) != self.args.steps_per_generation:
                raise RuntimeError(f"got {len(self.buffer)} rollout micro-batches for "
                                   f"steps_per_generation={self.args.steps_per_generation}")
        return self.buffer[self.micro_step % self.args.steps_per_generation]

    def advance(self) -> None:
        self.micro_step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"micro_step": self.micro_step, "rollout_index": self.rollout_index, "prompts": self.prompts.state_dict(),
                "buffer": None if self.buffer is None else [b.state() for b in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_step = int(state["micro_step"])
        self.rollout_index = int(state["rollout_index"])
        self.prompts.load_state_dict(state["prompts"])
        self.buffer = None if state["buffer"] is None else [RolloutBatch.from_state(b) for b in state["buffer"]]


ROLLOUT_STATE_NAME = "rollout_state_{rank}.pt"


class RolloutCheckpointMixin:
    """Saves and restores ``self.rollouts`` (a RolloutSource) with the Trainer's RNG state in every checkpoint."""

    rollouts: RolloutSource | None

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)  # type: ignore[misc]
        if getattr(self, "rollouts", None) is not None:
            rank = self.accelerator.process_index  # type: ignore[attr-defined]
            torch.save(self.rollouts.state_dict(), os.path.join(output_dir, ROLLOUT_STATE_NAME.format(rank=rank)))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)  # type: ignore[misc]
        if checkpoint is None or getattr(self, "rollouts", None) is None:
            return
        path = os.path.join(checkpoint, ROLLOUT_STATE_NAME.format(rank=self.accelerator.process_index))  # type: ignore[attr-defined]
        if not os.path.isfile(path):
            logger.warning("%s has no rollout state (a checkpoint of an older version or another process count): "
                           "the run continues with fresh rollouts and is not an exact continuation", checkpoint)
            return
        self.rollouts.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def grpo_backward(self, model, policy_weight: float, kl_weight: float, scale: float, no_sync) -> float:
        """Roll out if due, back-propagate the GRPO term of this micro-step per timestep, advance the counter."""
        policy = self.accelerator.unwrap_model(model)  # type: ignore[attr-defined]
        batch = self.rollouts.batch(policy)
        total = self.rollouts.objective.backward(
            model, batch, self.accelerator.backward, policy_weight=policy_weight, kl_weight=kl_weight,  # type: ignore[attr-defined]
            scale=scale, no_sync=no_sync, micro_step=self.rollouts.micro_step)
        self.rollouts.advance()
        return total
