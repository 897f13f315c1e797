"""The trainer of the forward-process online objectives (DiffusionNFT, AWM, DGPO) as a ``transformers.Trainer``,
batching like ``GRPOTrainer``: a generation batch of prompts is rolled out with the ODE sampler every
``steps_per_generation * num_iterations`` micro-steps, scored and buffered (``RolloutSource``; x0 and the grid
only); each micro-step back-propagates one trained timestep at a time. The rollout source, the RNG-free counters
and every extra adapter (NFT's ``old``, AWM's EMA, a sampling snapshot) go into every checkpoint, so
``--resume_from_checkpoint`` continues exactly.

Launch: ``accelerate launch align/nft.py --config recipes/nft_ocr.yaml`` (``awm.py``, ``dgpo.py`` likewise), or
``qwen-image-align nft|awm|dgpo``. Programmatically: ``ForwardRLTrainer(qwen, NFTConfig(...), prompts, reward_fn)``.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers import TrainerCallback

from qwen_image import QwenImage

from ..data.grpo import load_monitor_prompts
from ..reference import ReferenceModel
from ..rl.forward import ForwardRolloutBatch
from ..rl.monitor import add_monitor_callbacks, build_monitor
from ..rl.prompts import precompute_prompts_and_release
from ..rl.rewards import build_reward
from ..rl.source import RolloutSource
from .forward_objective import ForwardObjective, build_forward_objective
from .grpo import MicroSteps, OnlineRLTrainer, _collate_micro_steps, log_rollout_images

logger = logging.getLogger(__name__)


class AfterOptimizerStep(TrainerCallback):
    """Tells the objective that an optimizer step happened (EMA adapters move), before any checkpoint of that step
    is written (the Trainer saves after ``on_step_end``)."""

    def __init__(self, objective: ForwardObjective):
        self.objective = objective

    def on_step_end(self, args, state, control, **kwargs):
        self.objective.after_optimizer_step(state.global_step)


def online_reference(policy: torch.nn.Module, args, accelerator, needed: bool,
                     velocity_fn: Callable) -> ReferenceModel | None:
    """The frozen reference of an online term (adapters off for LoRA), built on the bare transformer;
    ``velocity_fn``: the bundle's velocity call (the model family's)."""
    if not needed:
        return None
    return ReferenceModel.from_policy(policy, args.finetune, args.init_adapter,
                                      velocity_fn=velocity_fn).prepare(accelerator)


class ForwardRLTrainer(OnlineRLTrainer):
    """DiffusionNFT / AWM / DGPO (``args.method``) on a Qwen-Image bundle; ``train_dataset`` rows hold ``prompt``
    plus the columns the rewards read (edit models: the control images); ``monitor_prompts`` feed the held-out
    monitor every ``eval_steps``."""

    def __init__(self, qwen: QwenImage, args, train_dataset, reward_fn=None, monitor_prompts=None, **kwargs):
        if qwen.text_encoder is None or qwen.vae is None:
            raise ValueError(f"{args.method} needs the text encoder (new prompts) and the VAE (images for the rewards).")
        if train_dataset is None:
            raise ValueError(f"{args.method} needs a prompt set: set dataset_name or train_prompts.")
        self.prompt_dataset = train_dataset
        if monitor_prompts is None and args.has_monitor:
            monitor_prompts = load_monitor_prompts(args)
        super().__init__(qwen, args, train_dataset=MicroSteps(len(train_dataset), args),
                         data_collator=_collate_micro_steps, eval_dataset=monitor_prompts, **kwargs)
        policy = self.model  # not wrapped yet: the reference and the extra adapters must see the bare transformer
        needs_reference = args.beta > 0 or args.method == "dgpo"
        reference = online_reference(policy, args, self.accelerator, needs_reference, qwen.predict_velocity)
        self.objective = build_forward_objective(args.method, qwen, args, reward_fn or build_reward(args),
                                                 self.accelerator, policy, reference, need_kl=args.beta > 0)
        self.rollouts = RolloutSource(self.objective.rollout, train_dataset, args, self.accelerator.process_index,
                                      ForwardRolloutBatch)
        self.checkpoint_states["rollout"] = self.rollouts
        self.checkpoint_states.update(self.objective.checkpoint_states)
        self.add_callback(AfterOptimizerStep(self.objective))
        self.monitor, self.guard = build_monitor(qwen, args, monitor_prompts, self.accelerator, policy, reference)
        add_monitor_callbacks(self, self.monitor, self.guard)
        qwen.vae.to(self.accelerator.device)
        self.keeps_text_encoder = not args.release_text_encoder
        precompute_prompts_and_release(qwen, args, train_dataset, monitor_prompts, self.accelerator.device)

    @property
    def online(self) -> ForwardObjective:
        return self.objective

    def _prepare_inputs(self, inputs):
        if not self.model.training:
            raise ValueError(f"{self.args.method} evaluates through its held-out monitor only (monitor_prompts).")
        return inputs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.objective.pop_metrics())
        super().log(logs, start_time)
        log_rollout_images(self.args, self.objective, self.state.global_step, self.accelerator.is_main_process)


# ------------------------------------------------------------------------------------------------ launch hooks
def load_forward_data(config):
    """Prompts, held-out prompts and the reward (a bad name fails here) before the model loads."""
    from ..data.grpo import load_grpo_prompts

    return load_grpo_prompts(config), load_monitor_prompts(config), build_reward(config)


def build_forward_trainer(config, qwen, data) -> ForwardRLTrainer:
    prompts, held_out, reward = data
    return ForwardRLTrainer(qwen, config, train_dataset=prompts, reward_fn=reward, monitor_prompts=held_out)
