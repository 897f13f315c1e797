"""Flow-GRPO as a reusable piece: the GRPO hyper-parameters (a dataclass mixin for any trainer config), rollout
generation + scoring + group advantages across processes, and the clipped-ratio loss (+ closed-form KL) on a
buffered rollout batch. ``GRPOTrainer`` and the combined DPO+GRPO trainer both drive it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen_image import QwenImage
from qwen_image.sampling import sde_step

from ..errors import UserError
from ..losses.grpo import KL_FORMS, gaussian_kl, group_advantages, grpo_clip_loss, num_train_timesteps, rewards_tensor
from ..rollouts import RolloutBatch, generate_rollouts, recompute_log_prob, score_images, sde_window_for

logger = logging.getLogger(__name__)

SCALE_REWARDS = ("group", "batch", "none", "true", "false")


@dataclass
class GRPOArguments:
    """GRPO fields (TRL's names where the idea is the same; defaults from flow_grpo). Mixed into trainer configs."""

    num_generations: int = field(default=8, metadata={"help": "Images per prompt (the group for advantages); flow_grpo: 16-24."})
    epsilon: float = field(default=1e-4, metadata={"help": "Clip range of the ratio; tiny because log-probs are per-element means (flow_grpo 1e-4; 1e-5 for Fast)."})
    scale_rewards: str = field(default="group", metadata={"help": "group: divide by the group std; batch: by the batch std; none: only centre."})
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to [-adv_clip_max, adv_clip_max]."})
    num_iterations: int = field(default=1, metadata={"help": "Optimisation passes over each rollout buffer (PPO epochs)."})
    steps_per_generation: int | None = field(default=None, metadata={"help": "Micro-batches per rollout buffer (default: gradient_accumulation_steps)."})
    reward_funcs: list[str] = field(default_factory=lambda: ["ocr"], metadata={"help": "Reward names from the rewards registry (rewards.available_rewards())."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward (default 1 each)."})
    reward_kwargs: dict | str | None = field(default=None, metadata={"help": "Options per reward, e.g. {\"clip\": {\"model_path\": \"/models/clip\"}} (a dict or JSON)."})
    train_prompts: list[str] = field(default_factory=list, metadata={"help": "Inline prompts (instead of dataset_name)."})
    kl_form: str = field(default="flow_grpo", metadata={"help": "flow_grpo: mean((mu-mu_ref)^2)/(2 sigma_t^2), the form published betas assume; exact: ||mu-mu_ref||^2/(2 sigma_t^2 |dt|)."})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (sigma_t = a sqrt(s/(1-s))); flow_grpo 0.7 (Qwen-Image 1.2 with a window)."})
    num_inference_steps: int = field(default=10, metadata={"help": "Sampler steps of a rollout (flow_grpo trains with 10, evaluates with 40-50)."})
    timestep_fraction: float = field(default=0.99, metadata={"help": "Fraction of the SDE steps trained per batch: int(T * fraction), a random subset."})
    sde_window_size: int = field(default=0, metadata={"help": "Flow-GRPO-Fast: SDE (and training) only on this many steps; 0 = every step."})
    sde_window_range: list[int] | None = field(default=None, metadata={"help": "[lo, hi): where the window may start (default [0, steps/2))."})
    true_cfg_scale: float = field(default=4.0, metadata={"help": "True CFG at rollout and training (1 = no CFG: faster, acts as CFG distillation)."})
    negative_prompt: str = field(default=" ", metadata={"help": "Negative prompt for true CFG."})
    release_text_encoder: bool = field(default=True, metadata={"help": "Encode every training prompt and the negative prompt once (kept on CPU), then free the text encoder (8 B params on the real model) before training."})
    num_images_to_log: int = field(default=8, metadata={"help": "Rollout images (with rewards) sent to wandb at each log step; 0 = none."})

    def _validate_grpo(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages compare images of the same prompt), got {self.num_generations}")
        if str(self.scale_rewards).lower() not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS[:3]}, got {self.scale_rewards!r}")
        if self.kl_form not in KL_FORMS:
            raise ValueError(f"kl_form must be one of {KL_FORMS}, got {self.kl_form!r}")
        if self.noise_level <= 0:
            raise ValueError(f"noise_level must be > 0 for GRPO rollouts, got {self.noise_level}")
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(self.reward_weights)} reward_weights for {len(self.reward_funcs)} reward_funcs")
        if isinstance(self.reward_kwargs, str):
            try:
                self.reward_kwargs = json.loads(self.reward_kwargs) if self.reward_kwargs.strip() else None
            except json.JSONDecodeError as err:
                raise ValueError(f"reward_kwargs is not valid JSON: {err}") from None
        if self.sde_window_size:
            sde_window_for(self.num_inference_steps, self.sde_window_size, self.sde_window_range)
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps  # type: ignore[attr-defined]
        global_batch = self.per_device_train_batch_size * self.world_size * self.steps_per_generation  # type: ignore[attr-defined]
        if global_batch % self.num_generations:
            raise ValueError(
                f"the generation batch (per_device_train_batch_size * processes * steps_per_generation = {global_batch}) "
                f"must be a multiple of num_generations ({self.num_generations})."
            )

    @property
    def generation_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.world_size * self.steps_per_generation  # type: ignore[attr-defined]

    @property
    def scale_mode(self) -> str:
        return {"true": "group", "false": "none"}.get(str(self.scale_rewards).lower(), str(self.scale_rewards).lower())


def precompute_prompts_and_release(qwen, args: GRPOArguments, prompts, device) -> None:
    """With ``release_text_encoder``: encode the finite prompt set once, then drop the text encoder; otherwise move it
    to ``device`` (rollouts encode their prompts as they come)."""
    from .base import release_text_encoder

    qwen.text_encoder.to(device)
    if not args.release_text_encoder:
        return
    count = qwen.prompt_encoder.precompute([*prompts, args.negative_prompt], progress=True)
    release_text_encoder(qwen)
    logger.info("encoded %d distinct prompts once; text encoder released", count)


def build_reward(args: GRPOArguments):
    """The configured reward: one registry reward, or a weighted ``rewards.CombinedReward`` (logs each part)."""
    from rewards import combine

    if not args.reward_funcs:
        raise UserError("reward_funcs is empty: name at least one reward (see rewards.available_rewards()).")
    kwargs = args.reward_kwargs or {}
    unknown = set(kwargs) - set(args.reward_funcs)
    if unknown:
        raise UserError(f"reward_kwargs for rewards not in reward_funcs: {sorted(unknown)}")
    try:
        return combine(list(args.reward_funcs), args.reward_weights, reward_kwargs=kwargs)
    except KeyError as err:
        raise UserError(str(err).strip("'\"")) from None


class GRPOObjective:
    """Rollouts + Flow-GRPO loss for one policy.

    ``rollout(policy, prompts, columns)`` samples the local prompts in micro-batches of ``batch_size``, scores them,
    gathers the rewards of every process to form groups, and returns micro-batches with advantages.
    ``loss(model, batch)`` recomputes the log-probs of a random ``timestep_fraction`` of the SDE steps and returns
    the clipped policy loss and the KL to ``reference`` (when ``need_kl``), averaged over those steps.
    Metrics go to ``self.metrics`` (name -> list of values; the trainer averages them at log time).
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
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.logged_images: list[tuple[Any, str]] = []
        rank = accelerator.process_index
        # Rollout noise differs across ranks; the SDE window and trained steps are drawn per rank but seeded.
        self._noise_gen = torch.Generator("cpu").manual_seed(args.seed * 1_000_003 + rank)
        self._step_gen = torch.Generator("cpu").manual_seed(args.seed * 7_919 + rank + 1)
        self._window_gen = torch.Generator("cpu").manual_seed(args.seed + 17)  # same on every rank
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
    def rollout(self, policy: torch.nn.Module, prompts: list[str], columns: dict[str, list] | None = None) -> list[RolloutBatch]:
        args = self.args
        start = time.perf_counter()
        was_training = policy.training
        policy.eval()
        window = sde_window_for(args.num_inference_steps, args.sde_window_size, args.sde_window_range, self._window_gen)
        columns = {k: list(v) for k, v in (columns or {}).items() if k != "prompt"}
        size = args.resolution
        chunks: list[RolloutBatch] = []
        local_totals: list[float | None] = []
        local_per: dict[str, list] = defaultdict(list)
        bs = args.per_device_train_batch_size
        for i in range(0, len(prompts), bs):
            sl = slice(i, i + bs)
            seeds = torch.randint(0, 2**31 - 1, (len(prompts[sl]),), generator=self._noise_gen).tolist()
            batch = generate_rollouts(
                self.qwen, policy, prompts[sl], {k: v[sl] for k, v in columns.items()}, height=size, width=size,
                num_inference_steps=args.num_inference_steps, noise_level=args.noise_level, sde_window=window,
                true_cfg_scale=args.true_cfg_scale, negative_prompt=args.negative_prompt, seeds=seeds,
                generator=self._noise_gen,
            )
            totals, per = score_images(self.reward_fn, batch.prompts, batch.images, batch.columns)
            batch.rewards = rewards_tensor(totals)
            batch.rewards_per_func = per
            local_totals += totals
            for k, v in per.items():
                local_per[k] += v
            chunks.append(batch)
        policy.train(was_training)
        self._set_advantages(chunks, local_totals, dict(local_per))
        self.rollout_seconds += time.perf_counter() - start
        self.num_rollouts += len(prompts)
        self.metrics["rollouts_per_s"].append(len(prompts) / max(time.perf_counter() - start, 1e-9))
        if window is not None:
            self.metrics["sde_window_start"].append(float(window[0]))
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
        m = self.metrics
        valid = rewards[~torch.isnan(rewards)]
        m["reward"].append(float(valid.mean()) if valid.numel() else math.nan)
        m["reward_std"].append(float(valid.std(unbiased=False)) if valid.numel() > 1 else math.nan)
        for name, vals in per.items():
            t = rewards_tensor(vals)
            t = t[~torch.isnan(t)]
            m[f"rewards/{name}/mean"].append(float(t.mean()) if t.numel() else math.nan)
            m[f"rewards/{name}/std"].append(float(t.std(unbiased=False)) if t.numel() > 1 else math.nan)
        groups = rewards.view(-1, self.args.num_generations)
        zero_std = [(g[~torch.isnan(g)].std(unbiased=False) if (~torch.isnan(g)).sum() > 1 else torch.tensor(0.0)) < 1e-8
                    for g in groups]
        m["frac_reward_zero_std"].append(float(sum(bool(z) for z in zero_std)) / len(zero_std))
        m["advantages/abs_mean"].append(float(adv.abs().mean()))
        m["advantages/max"].append(float(adv.max()))
        m["advantages/min"].append(float(adv.min()))

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
    def train_steps(self, batch: RolloutBatch) -> list[int]:
        """A random ``timestep_fraction`` of the batch's SDE steps (flow_grpo shuffles the steps per batch)."""
        k = num_train_timesteps(len(batch.sde_steps), self.args.timestep_fraction)
        order = torch.randperm(len(batch.sde_steps), generator=self._step_gen)[:k]
        return sorted(batch.sde_steps[i] for i in order.tolist())

    def loss(self, model: torch.nn.Module, batch: RolloutBatch, steps: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(policy loss, KL or None), each averaged over the trained steps. ``model`` may be DDP-wrapped."""
        device = self.accelerator.device
        batch = batch.to(device)
        adv = batch.advantages.to(device)
        old = batch.log_probs.to(device)
        steps = self.train_steps(batch) if steps is None else steps
        policy_losses, kls = [], []
        stats: dict[str, list[float]] = defaultdict(list)
        for j in steps:
            step = recompute_log_prob(model, batch, j)
            pl, m = grpo_clip_loss(step.log_prob, old[:, j], adv, self.args.epsilon)
            policy_losses.append(pl)
            for k, v in m.items():
                stats[k].append(v)
            if self.need_kl:
                kls.append(self._kl(batch, j, step.mean).mean())
        policy_loss = torch.stack(policy_losses).mean()
        kl = torch.stack(kls).mean() if kls else None
        met = self.metrics
        met["ratio/mean"].append(sum(stats["ratio_mean"]) / len(steps))
        met["ratio/min"].append(min(stats["ratio_min"]))
        met["ratio/max"].append(max(stats["ratio_max"]))
        met["clip_fraction"].append(sum(stats["clip_fraction"]) / len(steps))
        met["policy_loss"].append(float(policy_loss.detach()))
        if kl is not None:
            met[self.kl_metric].append(float(kl.detach()))
        return policy_loss, kl

    def _kl(self, batch: RolloutBatch, j: int, mean: torch.Tensor) -> torch.Tensor:
        x = batch.trajectory[:, j]
        v_ref = self.reference.velocity(x, batch.sigmas[j], batch.cond, batch.img_shapes, batch.negative,
                                        batch.true_cfg_scale)
        ref = sde_step(x, v_ref, float(batch.sigmas[j]), float(batch.sigmas[j + 1]), batch.noise_level,
                       batch.sigma_max, prev_sample=batch.trajectory[:, j + 1])
        return gaussian_kl(mean, ref.mean.detach(), batch.std_dev_t(j).to(mean.device), batch.step_dt(j),
                           self.args.kl_form)

    def pop_metrics(self) -> dict[str, float | None]:
        """Averages of the collected metrics (NaN-free; None when nothing valid) and a reset."""
        out = {}
        for k, vals in self.metrics.items():
            valid = [v for v in vals if not math.isnan(v)]
            out[k] = sum(valid) / len(valid) if valid else None
        self.metrics.clear()
        return out
