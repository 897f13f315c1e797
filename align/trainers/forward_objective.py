"""Forward-process online objectives over the objective-neutral online-RL package (``align/rl``): DiffusionNFT,
AWM and DGPO train on CFG-free ODE rollouts that keep only the clean latents x0, with a flow-matching-shaped loss
on ``x_t = (1 - t) x0 + t eps`` rebuilt from x0 with fresh noise at the sampler's timesteps. Driven by their own
trainers (``align/trainers/forward.py``) and by the combined trainer alike.

``ForwardObjective`` holds what the three share: the rollout (which adapter samples, scoring, group advantages
across processes), the per-micro-step plan of trained timesteps and noise (functions of the run seed and counters,
so a resumed run draws the same numbers), one backward per trained timestep, and the extra adapters it keeps
(their state goes into every checkpoint through ``checkpoint_states``). Each method adds its plan and its loss:

- ``NFTObjective``: an ``old`` adapter samples and is moved towards the trained one by EMA after optimizer steps;
  int(T * timestep_fraction) timesteps in a fresh random order per sample; the implicit positive / negative
  velocities loss (``align.losses.nft``);
- ``AWMObjective``: the current policy samples; ``awm_num_timesteps`` stratified timesteps shared by the
  micro-batch; the advantage-weighted, generalised-Huber flow-matching loss, optional EMA-KL adapter;
- ``DGPOObjective``: the current policy samples; every member of a group shares its noise and timesteps; the
  sigmoid group weight of the group's DPO-style score (reduced over processes) and the clip. The score's reference
  is the frozen base, or (``dgpo_reference: ema``) an ``ema_ref`` adapter moved towards the trained one after every
  optimizer step; the KL term keeps the frozen base.

AWM and DGPO compare with the sampling policy through a ratio. On-policy (each buffer trained once, within one
optimizer step) that policy IS the current one and the ratio is exactly 1; when a buffer is trained again after an
optimizer step, a ``sampler`` snapshot adapter taken at rollout time gives the sampling policy's numbers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch

from qwen_image import QwenImage

from ..configs.forward import buffer_is_on_policy
from ..data.grpo import reference_area
from ..losses.awm import awm_log_prob, awm_loss, awm_timestep_indices
from ..losses.dgpo import dgpo_loss, group_shared_noise
from ..losses.grpo import num_train_timesteps
from ..losses.nft import delayed_linear_decay, linear_decay, nft_implicit_velocities, nft_loss
from ..rl.adapters import ShadowAdapter
from ..rl.backward import PerTimestepBackward
from ..rl.forward import ForwardRolloutBatch, generate_ode_rollouts
from ..rl.monitor import group_diversity
from ..rl.scoring import GroupScoring
from ..rl.seeds import FORWARD_NOISE, FORWARD_STEPS, derived_generator, sample_seeds
from .base import MetricLog

logger = logging.getLogger(__name__)

# (t (B,), noise (B, L, C)) of one trained timestep
StepPlan = tuple[torch.Tensor, torch.Tensor]


def _dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


class ForwardObjective(PerTimestepBackward, GroupScoring):
    """Rollouts + loss of one forward-process method for one policy (see the module docstring).

    ``policy`` is the bare (unwrapped) transformer, ``reference`` an ``align.reference.ReferenceModel`` (adapters
    off for LoRA) or None; ``need_kl`` adds the KL term ``mean((v - v_ref)^2)`` that the caller weights.
    ``checkpoint_states`` names the objects a trainer must put into its checkpoints."""

    method = ""
    needs_reference = False

    def __init__(self, qwen: QwenImage, args: Any, reward_fn, accelerator, policy: torch.nn.Module,
                 reference=None, need_kl: bool = False):
        self.qwen = qwen
        self.args = args
        self.reward_fn = reward_fn
        self.accelerator = accelerator
        self.policy = policy
        self.reference = reference
        self.need_kl = need_kl
        if (need_kl or self.needs_reference) and reference is None:
            raise ValueError(f"{self.method}: the KL term (and DGPO's group score) needs the frozen reference model")
        self.metrics = MetricLog(accelerator)
        self.logged_images: list[tuple[Any, str]] = []
        self.num_rollouts = 0
        self.rollout_seconds = 0.0
        self.checkpoint_states: dict[str, Any] = {}
        self.sampler: ShadowAdapter | None = None  # the sampling policy's snapshot (off-policy AWM / DGPO)
        self.on_policy = buffer_is_on_policy(args)

    # ------------------------------------------------------------------ rollouts
    def sampling_policy(self, policy: torch.nn.Module):
        """Context yielding the module that samples the rollouts (the current policy by default)."""
        return contextlib.nullcontext(policy)

    @torch.no_grad()
    def rollout(self, policy: torch.nn.Module, prompts: list[str], columns: dict[str, list] | None = None,
                index: int = 0) -> list[ForwardRolloutBatch]:
        """ODE rollouts of this process's share of generation batch ``index``, scored, with group advantages.
        Sample ``i`` here is global sample ``rank * len(prompts) + i``; its initial noise depends on (run seed,
        ``index``, that global index) alone."""
        args = self.args
        start = time.perf_counter()
        was_training = policy.training
        policy.eval()
        columns = {k: list(v) for k, v in (columns or {}).items() if k != "prompt"}
        first = self.accelerator.process_index * len(prompts)
        seeds = sample_seeds(args.seed, index, first, len(prompts))
        chunks: list[ForwardRolloutBatch] = []
        local_totals: list[float | None] = []
        local_per: dict[str, list] = {}
        bs = args.rollout_batch_size
        with self.sampling_policy(policy) as sampler:
            for i in range(0, len(prompts), bs):
                sl = slice(i, i + bs)
                batch = generate_ode_rollouts(
                    self.qwen, sampler, prompts[sl], {k: v[sl] for k, v in columns.items()},
                    height=args.resolution, width=args.resolution, num_inference_steps=args.num_inference_steps,
                    seeds=seeds[sl], sample_index=range(first + i, first + i + len(prompts[sl])),
                    true_cfg_scale=args.true_cfg_scale, negative_prompt=args.negative_prompt,
                    reference_area=reference_area(args),
                )
                self._score(batch, local_totals, local_per)
                chunks.append(batch)
        policy.train(was_training)
        if self.sampler is not None:
            self.sampler.copy_from_trained()  # the policy that sampled this buffer, for later ratios
        self._set_advantages(chunks, local_totals, local_per)
        elapsed = time.perf_counter() - start
        self.rollout_seconds += elapsed
        self.num_rollouts += len(prompts)
        self.metrics.add({"group_diversity": group_diversity(chunks), "rollouts_per_s": len(prompts) / max(elapsed, 1e-9)})
        self._keep_images(chunks)
        return chunks

    # ------------------------------------------------------------------ the plan of a micro-step
    def plan(self, batch: ForwardRolloutBatch, micro_step: int) -> list[StepPlan]:
        """The trained timesteps (noise level per sample) and their fresh noise, one entry per backward."""
        raise NotImplementedError

    def _noise(self, batch: ForwardRolloutBatch, micro_step: int, k: int) -> torch.Tensor:
        gen = derived_generator(self.args.seed, FORWARD_NOISE, self.accelerator.process_index, micro_step, k)
        return torch.randn(tuple(batch.x0.shape), generator=gen, dtype=torch.float32)

    @staticmethod
    def noised(batch: ForwardRolloutBatch, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps (fp32 arithmetic, in the rollout latents' dtype)."""
        x0 = batch.x0.float()
        tt = t.to(x0.device, torch.float32).view(-1, *([1] * (x0.dim() - 1)))
        return ((1 - tt) * x0 + tt * noise.to(x0.device)).to(batch.x0.dtype)

    # ------------------------------------------------------------------ velocities
    def velocity(self, module: torch.nn.Module, batch: ForwardRolloutBatch, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """The conditional velocity at per-sample noise levels ``t`` (edit models: the references ride in cond)."""
        return self.qwen.predict_velocity(module, x_t, t, batch.cond, batch.img_shapes)

    @torch.no_grad()
    def shadow_velocity(self, adapter: ShadowAdapter, batch: ForwardRolloutBatch, x_t: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
        with adapter.active() as module:
            return self.velocity(module, batch, x_t, t).detach()

    @torch.no_grad()
    def reference_velocity(self, batch: ForwardRolloutBatch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.reference.velocity(x_t, t, batch.cond, batch.img_shapes)

    # ------------------------------------------------------------------ loss
    def step_terms(self, model: torch.nn.Module, batch: ForwardRolloutBatch, t: torch.Tensor,
                   noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(policy loss, KL or None, statistics) of one trained timestep (``batch`` on the device)."""
        raise NotImplementedError

    def _kl(self, v: torch.Tensor, v_ref: torch.Tensor | None) -> torch.Tensor | None:
        if not self.need_kl:
            return None
        return ((v.float() - v_ref.float()) ** 2).mean(dim=_dims(v)).mean()

    def _on_device(self, batch: ForwardRolloutBatch) -> ForwardRolloutBatch:
        return batch.to(self.accelerator.device)

    # the hooks of PerTimestepBackward: one item of the plan per trained timestep
    def trained_timesteps(self, batch: ForwardRolloutBatch, micro_step: int) -> list[StepPlan]:
        return self.plan(batch, micro_step)

    def timestep_terms(self, model: torch.nn.Module, batch: ForwardRolloutBatch,
                       item: StepPlan) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        t, noise = item
        return self.step_terms(model, batch, t.to(self.accelerator.device), noise)

    def after_optimizer_step(self, global_step: int) -> None:
        """Called once per optimizer step (the EMA adapters move here)."""

    def _record(self, stats: list[dict], policy_loss: float, kl: float | None) -> None:
        m: dict[str, float] = {"policy_loss": policy_loss}
        for key in stats[0]:
            if key in ("policy_loss", "kl"):
                continue
            values = [s[key] for s in stats]
            name = "ratio/" + key[len("ratio_"):] if key.startswith("ratio_") else key  # GRPO's names
            if name.endswith(("_min", "/min")):
                m[name[:-4] + "/min"] = min(values)
            elif name.endswith(("_max", "/max")):
                m[name[:-4] + "/max"] = max(values)
            else:
                m[name] = sum(values) / len(values)
        if kl is not None:
            m["kl"] = kl
        self.metrics.add(m)

    @property
    def kl_metric(self) -> str:
        return "kl"

    def pop_metrics(self) -> dict[str, float]:
        return self.metrics.pop()


# ------------------------------------------------------------------------------------------------ DiffusionNFT
class NFTObjective(ForwardObjective):
    """DiffusionNFT: the ``old`` adapter samples; the loss mixes the trained and old velocities (module docstring)."""

    method = "nft"

    def __init__(self, qwen, args, reward_fn, accelerator, policy, reference=None, need_kl: bool = False):
        super().__init__(qwen, args, reward_fn, accelerator, policy, reference, need_kl)
        self.old = ShadowAdapter(policy, "old")
        self.checkpoint_states["old_adapter"] = self.old

    def sampling_policy(self, policy):
        return self.old.active()

    def plan(self, batch: ForwardRolloutBatch, micro_step: int) -> list[StepPlan]:
        # A fresh random order of the sampler's timesteps per sample; the first int(T * fraction) are trained.
        timesteps = batch.timesteps
        T = len(timesteps)
        k = num_train_timesteps(T, self.args.timestep_fraction)
        gen = derived_generator(self.args.seed, FORWARD_STEPS, self.accelerator.process_index, micro_step)
        order = torch.stack([torch.randperm(T, generator=gen) for _ in range(len(batch))])  # (B, T)
        return [(timesteps[order[:, j]], self._noise(batch, micro_step, j)) for j in range(k)]

    def velocities(self, model, batch: ForwardRolloutBatch, x_t: torch.Tensor, t: torch.Tensor):
        """(v with grad, v_old, v_ref or None): the trained forward first (the reference after it, see
        align/reference.py), then the old adapter's and the reference's without grad."""
        v = self.velocity(model, batch, x_t, t)
        v_old = self.shadow_velocity(self.old, batch, x_t, t)
        v_ref = self.reference_velocity(batch, x_t, t) if self.reference is not None else None
        return v, v_old, v_ref

    def step_terms(self, model, batch, t, noise):
        args = self.args
        x_t = self.noised(batch, t, noise)
        v, v_old, v_ref = self.velocities(model, batch, x_t, t)
        policy, stats = nft_loss(v, v_old, v_ref, x_t, batch.x0, t, batch.advantages, args.nft_beta,
                                 args.adv_clip_max, kl_coef=0.0)
        return policy, self._kl(v, v_ref), stats

    def implicit_velocities(self, model, batch: ForwardRolloutBatch, t: torch.Tensor, noise: torch.Tensor):
        """(v, v_pos, v_neg) at one planned timestep, as the loss forms them (for diagnostics and tests)."""
        batch = self._on_device(batch)
        x_t = self.noised(batch, t.to(self.accelerator.device), noise)
        v, v_old, _ = self.velocities(model, batch, x_t, t.to(self.accelerator.device))
        v_pos, v_neg = nft_implicit_velocities(v, v_old, self.args.nft_beta)
        return v, v_pos, v_neg

    def after_optimizer_step(self, global_step: int) -> None:
        if global_step % self.args.old_update_interval:
            return
        delay, rate, cap = self.args.old_schedule()
        decay = delayed_linear_decay(self.old.updates, delay, rate, cap)
        self.old.update(decay)
        self.metrics.add({"old_decay": decay, "old_adapter_rms_gap": self.old.deviation()})


# ------------------------------------------------------------------------------------------------ AWM
class AWMObjective(ForwardObjective):
    """AWM: on-policy rollouts, the advantage-weighted generalised-Huber flow-matching loss (module docstring)."""

    method = "awm"

    def __init__(self, qwen, args, reward_fn, accelerator, policy, reference=None, need_kl: bool = False):
        super().__init__(qwen, args, reward_fn, accelerator, policy, reference, need_kl)
        self.ema: ShadowAdapter | None = None
        if args.awm_ema_kl_coef > 0:
            self.ema = ShadowAdapter(policy, "ema")
            self.checkpoint_states["ema_adapter"] = self.ema
        if not self.on_policy:
            self.sampler = ShadowAdapter(policy, "sampler")
            self.checkpoint_states["sampler_adapter"] = self.sampler

    def plan(self, batch: ForwardRolloutBatch, micro_step: int) -> list[StepPlan]:
        # Stratified timesteps shared by the micro-batch, fresh noise for each.
        timesteps = batch.timesteps
        gen = derived_generator(self.args.seed, FORWARD_STEPS, self.accelerator.process_index, micro_step)
        idx = awm_timestep_indices(len(timesteps), self.args.awm_num_timesteps, self.args.timestep_fraction, gen)
        return [(timesteps[int(i)].expand(len(batch)).clone(), self._noise(batch, micro_step, k))
                for k, i in enumerate(idx)]

    def log_prob(self, v: torch.Tensor, batch: ForwardRolloutBatch, noise: torch.Tensor, t: torch.Tensor):
        args = self.args
        return awm_log_prob(v, noise.to(v.device), batch.x0, t, args.awm_weighting, args.awm_ghuber_power)

    def step_terms(self, model, batch, t, noise):
        args = self.args
        x_t = self.noised(batch, t, noise)
        v = self.velocity(model, batch, x_t, t)
        log_prob = self.log_prob(v, batch, noise, t)
        old_log_prob = None
        if self.sampler is not None:
            old_log_prob = self.log_prob(self.shadow_velocity(self.sampler, batch, x_t, t), batch, noise, t)
        v_ema = self.shadow_velocity(self.ema, batch, x_t, t) if self.ema is not None else None
        v_ref = self.reference_velocity(batch, x_t, t) if self.need_kl else None
        policy, stats = awm_loss(log_prob, batch.advantages, old_log_prob, v=v, v_ema=v_ema,
                                 adv_clip_max=args.adv_clip_max, advantage_max=args.awm_advantage_max,
                                 clip_range=args.awm_clip_range, ema_kl_coef=args.awm_ema_kl_coef)
        return policy, self._kl(v, v_ref), stats

    def after_optimizer_step(self, global_step: int) -> None:
        if self.ema is not None:
            decay = linear_decay(self.ema.updates, self.args.awm_ema_decay_rate, self.args.awm_ema_decay_cap)
            self.ema.update(decay)


# ------------------------------------------------------------------------------------------------ DGPO
class DGPOObjective(ForwardObjective):
    """DGPO: group-shared noise and timesteps, sigmoid group weight of a score reduced over processes. With
    ``dgpo_reference: ema`` the score compares with an ``ema_ref`` adapter instead of the frozen base."""

    method = "dgpo"
    needs_reference = True  # the group score (frozen mode) and the KL term compare with the frozen base

    def __init__(self, qwen, args, reward_fn, accelerator, policy, reference=None, need_kl: bool = False):
        super().__init__(qwen, args, reward_fn, accelerator, policy, reference, need_kl)
        self.num_groups = args.generation_batch_size // args.num_generations
        self.ema_ref: ShadowAdapter | None = None
        if args.dgpo_reference == "ema":
            self.ema_ref = ShadowAdapter(policy, "ema_ref")
            self.checkpoint_states["ema_ref_adapter"] = self.ema_ref
        if not self.on_policy:
            self.sampler = ShadowAdapter(policy, "sampler")
            self.checkpoint_states["sampler_adapter"] = self.sampler

    def group_ids(self, batch: ForwardRolloutBatch) -> torch.Tensor:
        return batch.sample_index // self.args.num_generations

    def plan(self, batch: ForwardRolloutBatch, micro_step: int) -> list[StepPlan]:
        # Drawn from (run seed, micro-step) alone - the same on every process - and indexed by GLOBAL group id, so
        # the members of a group agree on their noise and timesteps wherever they are.
        timesteps = batch.timesteps
        T = len(timesteps)
        k = num_train_timesteps(T, self.args.timestep_fraction)
        gen = derived_generator(self.args.seed, FORWARD_STEPS, micro_step)
        order = torch.stack([torch.randperm(T, generator=gen) for _ in range(self.num_groups)])  # (groups, T)
        ids = self.group_ids(batch)
        shape = tuple(batch.x0.shape[1:])
        plan = []
        for j in range(k):
            noise_gen = derived_generator(self.args.seed, FORWARD_NOISE, micro_step, j)
            plan.append((timesteps[order[ids, j]], group_shared_noise(ids, self.num_groups, shape, noise_gen)))
        return plan

    def _err(self, v: torch.Tensor, batch: ForwardRolloutBatch, noise: torch.Tensor) -> torch.Tensor:
        target = noise.to(v.device) - batch.x0.float()
        return ((v.float() - target) ** 2).mean(dim=_dims(v))

    def errors(self, model, batch: ForwardRolloutBatch, t: torch.Tensor, noise: torch.Tensor):
        """(err with grad, the score reference's err, the sampling policy's err or None, v, v_ref or None) at one
        planned timestep: the trained forward first (see the ShadowAdapter trap), then the frozen base (when the
        score or the KL needs it), the EMA reference and the sampling snapshot, without grad."""
        x_t = self.noised(batch, t, noise)
        v = self.velocity(model, batch, x_t, t)
        err = self._err(v, batch, noise)
        v_ref = self.reference_velocity(batch, x_t, t) if self.ema_ref is None or self.need_kl else None
        if self.ema_ref is None:
            ref_err = self._err(v_ref, batch, noise)
        else:
            ref_err = self._err(self.shadow_velocity(self.ema_ref, batch, x_t, t), batch, noise)
        old_err = None
        if self.sampler is not None:
            old_err = self._err(self.shadow_velocity(self.sampler, batch, x_t, t), batch, noise)
        return err, ref_err, old_err, v, v_ref

    def step_terms(self, model, batch, t, noise):
        args = self.args
        err, ref_err, old_err, v, v_ref = self.errors(model, batch, t, noise)
        ids = self.group_ids(batch).to(err.device)
        policy, stats = dgpo_loss(err, ref_err, batch.advantages, ids, self.num_groups, args.dgpo_beta_dpo, old_err,
                                  args.dgpo_clip_range, adv_clip_max=args.adv_clip_max,
                                  all_reduce=lambda x: self.accelerator.reduce(x, reduction="sum"))
        return policy, self._kl(v, v_ref), stats

    def after_optimizer_step(self, global_step: int) -> None:
        if self.ema_ref is None:
            return
        decay = linear_decay(self.ema_ref.updates, self.args.dgpo_ema_decay_rate, self.args.dgpo_ema_decay_cap)
        self.ema_ref.update(decay)
        self.metrics.add({"ema_ref_decay": decay, "ema_ref_rms_gap": self.ema_ref.deviation()})


OBJECTIVES = {"nft": NFTObjective, "awm": AWMObjective, "dgpo": DGPOObjective}


def build_forward_objective(method: str, qwen, args, reward_fn, accelerator, policy, reference=None,
                            need_kl: bool = False) -> ForwardObjective:
    return OBJECTIVES[method](qwen, args, reward_fn, accelerator, policy, reference, need_kl)
