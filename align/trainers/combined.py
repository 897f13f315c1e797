"""The combined objective ``L = w_dpo * L_DPO + w_online * L_online + w_kto * L_KTO + beta_kl * KL (+ w_sft * L_FM)``.

The DPO term (and its velocity-form KL, and SFT) runs on offline preference pairs exactly as ``FlowDPOTrainer``
does; the online term (``online``: Flow-GRPO on SDE rollouts, or DiffusionNFT / AWM / DGPO on ODE rollouts) runs on
a separate prompt set (``RolloutSource``, the same component the standalone trainers use), with its own KL to the
reference (``kl_rollout``, weighted by the same ``beta_kl``: GRPO's closed form per step, the forward methods'
mean((v - v_ref)^2)). One frozen reference serves DPO, both KL terms and DGPO's group score. Each term is logged
apart (``loss/dpo``, ``loss/<method>``, ``loss/kl``, ``loss/kl_rollout``; the method's statistics under
``<method>/``). The forward methods' extra adapters (NFT's old, ...) are checkpoint states like the rollout buffer.

A micro-step back-propagates the offline terms once (skipped when their weights are all 0), then the online term
one trained timestep at a time. ``w_online = 0`` is plain Flow-DPO; ``w_dpo = beta_kl = w_sft = 0`` is the online
method alone on the rollouts.

With ``w_kto > 0`` a Diffusion-KTO term on rated images (``kto_dataset_name``) joins the offline terms: its
batches come from a :class:`~align.trainers.kto.RatedBatchSource` (its position saved in checkpoints), the same
reference serves it, and it is back-propagated with the DPO terms (``loss/kto``; its statistics under ``kto/``).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from accelerate.utils import DistributedType

from qwen_image.errors import UserError

from ..configs.combined import DPOGRPOConfig
from ..data.grpo import load_monitor_prompts
from ..rl.forward import ForwardRolloutBatch
from ..rl.monitor import MonitoredEvaluationMixin, add_monitor_callbacks, build_monitor
from ..rl.prompts import precompute_prompts_and_release
from ..rl.rewards import build_reward
from ..rl.rollouts import RolloutBatch
from ..rl.source import RolloutSource
from ..rl.term_gradients import TermGradientNorms
from .dpo import FlowDPOTrainer
from .forward import AfterOptimizerStep
from .forward_objective import ForwardObjective, build_forward_objective
from .grpo import log_rollout_images
from .grpo_objective import GRPOObjective
from .kto import KTOTerm, RatedBatchSource, rated_collator

logger = logging.getLogger(__name__)


class DPOGRPOTrainer(MonitoredEvaluationMixin, FlowDPOTrainer):
    """Flow-DPO on pairs + the online term on rollouts of ``grpo_prompts``, one frozen reference; held-out
    ``monitor_prompts`` feed the over-optimisation monitors every ``eval_steps`` (next to the held-out pairs)."""

    training_reward_key = "grpo/reward"
    loss_weight_names = (*FlowDPOTrainer.loss_weight_names, "w_online", "w_kto")

    def __init__(self, qwen, args: DPOGRPOConfig, train_dataset=None, grpo_prompts=None, reward_fn=None,
                 monitor_prompts=None, rated=None, **kwargs):
        if monitor_prompts is None and args.has_monitor:
            monitor_prompts = load_monitor_prompts(args)
        self.parent_evaluates = kwargs.get("eval_dataset") is not None  # held-out pairs: implicit accuracy
        if not self.parent_evaluates and monitor_prompts is not None:
            kwargs["eval_dataset"] = monitor_prompts  # the Trainer wants an eval set for its schedule
        super().__init__(qwen, args, train_dataset=train_dataset, **kwargs)
        # The online objective (named ``grpo`` for the recipes and tools that read it; ``online`` is the same).
        self.grpo: GRPOObjective | ForwardObjective | None = None
        self.rollouts: RolloutSource | None = None
        self.method = args.online_method
        if self.method is not None:
            if grpo_prompts is None:
                raise UserError(f"the online term ({self.method}) needs prompts: set grpo_dataset_name or train_prompts.")
            if qwen.text_encoder is None or qwen.vae is None:
                raise ValueError("the online term needs the text encoder (prompts) and the VAE (images for the rewards).")
            # Zero reward spread stops a run only when nothing else trains: beside DPO / KTO / flow matching it may
            # just mean the reward is saturated on these prompts (align.rl.rewards.SignalWatch).
            others_train = any(getattr(args, w) > 0 for w in ("w_dpo", "w_kto", "w_sft"))
            reward = reward_fn or build_reward(args, stop_on_zero_spread=not others_train)
            if self.method == "grpo":
                self.grpo = GRPOObjective(qwen, args, reward, self.accelerator, self.reference, need_kl=args.beta_kl > 0)
                batch_type = RolloutBatch
            else:  # self.model is still the bare transformer: the extra adapters go onto it
                self.grpo = build_forward_objective(self.method, qwen, args, reward, self.accelerator, self.model,
                                                    self.reference, need_kl=args.beta_kl > 0)
                self.checkpoint_states.update(self.grpo.checkpoint_states)
                self.add_callback(AfterOptimizerStep(self.grpo))
                batch_type = ForwardRolloutBatch
            self.training_reward_key = f"{self.method}/reward"
            self.rollouts = RolloutSource(self.grpo.rollout, grpo_prompts, args, self.accelerator.process_index,
                                          batch_type)
            self.checkpoint_states["rollout"] = self.rollouts
            self.monitor, self.guard = build_monitor(qwen, args, monitor_prompts, self.accelerator, self.model,
                                                     self.reference)
            add_monitor_callbacks(self, self.monitor, self.guard)
            self.keeps_text_encoder = not args.release_text_encoder  # rollouts encode their prompts as they come
            precompute_prompts_and_release(qwen, args, grpo_prompts, monitor_prompts, self.accelerator.device)
        self.term_grads: TermGradientNorms | None = None
        if args.log_term_grad_norms and self.grpo is not None:  # the config refused several processes, DeepSpeed
            self.term_grads = TermGradientNorms(self.model.parameters())
        self.kto: KTOTerm | None = None
        self.rated: RatedBatchSource | None = None
        if args.w_kto > 0:
            if rated is None:
                raise ValueError("w_kto > 0 needs the encoded rated images (align.data.kto.encode_kto_rows)")
            self.kto = KTOTerm(self, self.reference, args.kto_beta, args.desirable_weight, args.undesirable_weight,
                               args.kl_estimate)
            self.rated = RatedBatchSource(rated, args.kto_images_per_step, rated_collator(qwen.edit_model, args),
                                          args.seed, self.accelerator.process_index, self.accelerator.num_processes)
            self.checkpoint_states["kto"] = self.rated

    @property
    def dpo_weights_active(self) -> bool:
        return super().dpo_weights_active or self.kto is not None

    def kto_terms(self, model) -> tuple[dict, dict]:
        """The KTO term on the next batch of rated images (training only)."""
        if self.kto is None or not model.training:
            return {}, {}
        loss, metrics, _, _ = self.kto(model, self._prepare_inputs(self.rated.next_batch()))
        return {"kto": (self.args.w_kto, loss)}, {f"kto/{k}": v for k, v in metrics.items()}

    def offline_terms(self, model, inputs: dict) -> tuple[dict, dict]:
        """The terms on offline data: DPO's on the pairs (when weighted) and KTO's on the rated images."""
        terms, metrics = self.dpo_terms(model, inputs) if FlowDPOTrainer.dpo_weights_active.fget(self) else ({}, {})
        kto, kto_metrics = self.kto_terms(model)
        return {**terms, **kto}, {**metrics, **kto_metrics}

    def extra_loss_terms(self, model, inputs: dict) -> tuple[dict, dict]:
        """The GRPO term as one graph over its trained timesteps (``compute_loss``; DeepSpeed trains this way)."""
        if not model.training:
            return {}, {}
        terms, metrics = self.kto_terms(model)
        if self.grpo is None:
            return terms, metrics
        batch = self.rollouts.batch(self.accelerator.unwrap_model(model))
        policy_loss, kl = self.grpo.loss(model, batch, micro_step=self.rollouts.micro_step)
        terms[self.method] = (self.args.w_online, policy_loss)
        if kl is not None:
            terms["kl_rollout"] = (self.args.beta_kl, kl)
        return terms, metrics

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.grpo is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            out = super().training_step(model, inputs, num_items_in_batch)  # every term in one backward
            self.rollouts.advance()
            return out
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        scale = 1.0 / self.current_gradient_accumulation_steps
        total = 0.0
        if self.term_grads is not None:
            self.term_grads.begin()
        if self.dpo_weights_active:
            inputs = self._prepare_inputs(inputs)
            with self.accelerator.no_sync(model):  # the last GRPO timestep reduces the summed gradient
                loss = self.weighted_loss(*self.offline_terms(model, inputs), mode="train")
                self.accelerator.backward(loss * scale)
            total += float(loss.detach())
            if self.term_grads is not None:
                self.term_grads.mark("offline")
        total += self.grpo.micro_step(self.rollouts, model, policy_weight=self.args.w_online,
                                      kl_weight=self.args.beta_kl, scale=scale,
                                      no_sync=partial(self.accelerator.no_sync, model))
        if self.term_grads is not None:
            self.term_grads.mark(self.method)
            if self.accelerator.sync_gradients:  # this micro-step completes the optimiser step
                self.term_grads.end_of_step()
        return torch.tensor(total * scale, device=self.accelerator.device)

    @property
    def online(self) -> GRPOObjective | ForwardObjective | None:
        return self.grpo

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.grpo is not None:
            online = self.grpo.pop_metrics()
            for name in ("policy_loss", self.grpo.kl_metric):
                if name in online:  # the online terms under the same names as the DPO terms
                    logs[f"loss/{self.method}" if name == "policy_loss" else "loss/kl_rollout"] = online[name]
            logs.update({f"{self.method}/{k}": v for k, v in online.items()})
        if self.term_grads is not None and "loss" in logs:
            logs.update(self.term_grads.pop_metrics())
        super().log(logs, start_time)
        if self.grpo is not None:
            log_rollout_images(self.args, self.grpo, self.state.global_step, self.accelerator.is_main_process)
