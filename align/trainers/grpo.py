"""Flow-GRPO trainer (online RL on SDE rollouts) as a ``transformers.Trainer``, batching like TRL's GRPOTrainer:
a generation batch of prompts (RepeatSampler: ``num_generations`` copies of each prompt, consistent across
processes) is rolled out every ``steps_per_generation * num_iterations`` micro-steps, scored and buffered as
``steps_per_generation`` micro-batches that the next micro-steps train on (``RolloutSource``). The Trainer's own
dataloader only counts micro-steps; the prompt stream, the buffer and every random choice live in the rollout
source, which each checkpoint saves, so ``--resume_from_checkpoint`` continues exactly.

Each micro-step back-propagates one trained timestep at a time (flow_grpo's loop): memory does not grow with the
number of trained timesteps.

Launch: ``accelerate launch align/grpo.py --config recipes/grpo_ocr.yaml``.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from accelerate.utils import DistributedType
from torch.utils.data import Dataset

from qwen_image import QwenImage
from qwen_image.errors import UserError

from ..configs.grpo import GRPOConfig
from ..data.grpo import load_monitor_prompts
from ..reference import ReferenceModel
from ..rl.monitor import MonitoredEvaluationMixin, add_monitor_callbacks, build_monitor
from ..rl.prompts import precompute_prompts_and_release
from ..rl.rewards import build_reward
from ..rl.rollouts import RolloutBatch
from ..rl.source import RolloutSource
from .base import QwenImageTrainer
from .grpo_objective import GRPOObjective

logger = logging.getLogger(__name__)


class MicroSteps(Dataset):
    """The Trainer's dataset for GRPO: one empty item per micro-batch of an epoch over the prompts (the rollout
    source supplies the data). An epoch is every prompt sampled ``num_generations`` times, ``num_iterations``
    passes each."""

    def __init__(self, num_prompts: int, args: GRPOConfig):
        unique_per_generation = args.generation_batch_size // args.num_generations
        generations = max(1, num_prompts // unique_per_generation)
        self.length = generations * args.steps_per_generation * args.num_iterations * args.world_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {}


def _collate_micro_steps(items: list[dict]) -> dict:
    return {}


class OnlineRLTrainer(MonitoredEvaluationMixin, QwenImageTrainer):
    """The micro-step of the standalone online trainers (``GRPOTrainer``, ``ForwardRLTrainer``): the Trainer's
    dataloader only counts micro-steps (``MicroSteps``), ``self.rollouts`` supplies each one's rollouts and
    ``self.online`` (the objective) back-propagates them one trained timestep at a time, its KL to the reference
    weighted by ``args.beta``."""

    rollouts: RolloutSource

    def get_train_dataloader(self):
        # one (empty) item per micro-step and process; batch size 1 so the Trainer's step count is the micro-step count
        return self._get_dataloader(dataset=self.train_dataset, description="Training", batch_size=1,
                                    sampler_fn=torch.utils.data.SequentialSampler, is_training=True)

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        scale = 1.0 / self.current_gradient_accumulation_steps
        accelerator = self.accelerator
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed steps its engine inside every backward: one backward per micro-step (all timesteps at once).
            loss = self.compute_loss(model, inputs)
            accelerator.backward(loss, scale_wrt_gas=False)
            self.rollouts.advance()
            return loss.detach() * scale
        kl_weight = self.args.beta if self.online.need_kl else 0.0
        total = self.online.micro_step(self.rollouts, model, policy_weight=1.0, kl_weight=kl_weight,
                                       scale=scale, no_sync=partial(accelerator.no_sync, model))
        return torch.tensor(total * scale, device=accelerator.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-step's loss as one graph: what ``training_step`` back-propagates per timestep, and, under
        DeepSpeed (one backward per micro-step), what it back-propagates whole."""
        batch = self.rollouts.batch(self.accelerator.unwrap_model(model))
        policy_loss, kl = self.online.loss(model, batch, micro_step=self.rollouts.micro_step)
        loss = policy_loss if kl is None else policy_loss + self.args.beta * kl
        return (loss, None) if return_outputs else loss


class GRPOTrainer(OnlineRLTrainer):
    """Flow-GRPO on a Qwen-Image bundle; ``train_dataset`` rows hold ``prompt`` plus columns the rewards read;
    ``monitor_prompts`` (held-out, same layout) feed the over-optimisation monitors every ``eval_steps``."""

    def __init__(self, qwen: QwenImage, args: GRPOConfig, train_dataset, reward_fn=None, monitor_prompts=None, **kwargs):
        if qwen.text_encoder is None or qwen.vae is None:
            raise ValueError("GRPO needs the text encoder (new prompts) and the VAE (images for the rewards).")
        if train_dataset is None:
            raise UserError("GRPO needs a prompt set: set dataset_name or train_prompts.")
        self.prompt_dataset = train_dataset
        if monitor_prompts is None and args.has_monitor:
            monitor_prompts = load_monitor_prompts(args)
        super().__init__(qwen, args, train_dataset=MicroSteps(len(train_dataset), args),
                         data_collator=_collate_micro_steps, eval_dataset=monitor_prompts, **kwargs)
        policy = self.model  # not wrapped yet: the reference must see the bare transformer
        reference = (ReferenceModel.from_policy(policy, args.finetune, args.init_adapter,
                                                velocity_fn=qwen.predict_velocity).prepare(self.accelerator)
                     if args.beta > 0 else None)
        self.grpo = GRPOObjective(qwen, args, reward_fn or build_reward(args), self.accelerator, reference, need_kl=args.beta > 0)
        self.rollouts = RolloutSource(self.grpo.rollout, train_dataset, args, self.accelerator.process_index, RolloutBatch)
        self.checkpoint_states["rollout"] = self.rollouts
        self.monitor, self.guard = build_monitor(qwen, args, monitor_prompts, self.accelerator, policy, reference)
        add_monitor_callbacks(self, self.monitor, self.guard)
        qwen.vae.to(self.accelerator.device)
        self.keeps_text_encoder = not args.release_text_encoder  # rollouts encode their prompts as they come
        precompute_prompts_and_release(qwen, args, train_dataset, monitor_prompts, self.accelerator.device)

    @property
    def online(self) -> GRPOObjective:
        return self.grpo

    def _prepare_inputs(self, inputs):
        if not self.model.training:
            raise ValueError("GRPOTrainer evaluates through its held-out monitor only (monitor_prompts).")
        return inputs

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.grpo.pop_metrics())
        super().log(logs, start_time)
        log_rollout_images(self.args, self.grpo, self.state.global_step, self.accelerator.is_main_process)


def log_rollout_images(args, objective: GRPOObjective, step: int, is_main: bool) -> None:
    """Send the latest rollouts (captioned with prompt, reward, advantage) to wandb as an image grid."""
    if not is_main or not objective.logged_images or "wandb" not in (args.report_to or []):
        return
    import wandb

    if wandb.run is not None:
        wandb.log({"rollouts": [wandb.Image(im, caption=c) for im, c in objective.logged_images]}, step=step)
    objective.logged_images = []
