"""Flow-GRPO trainer (online RL on SDE rollouts) as a ``transformers.Trainer``, batching like TRL's GRPOTrainer:
the dataloader yields a *generation* batch of prompts (RepeatSampler: ``num_generations`` copies of each prompt,
consistent across processes); every ``steps_per_generation * num_iterations`` micro-steps it is rolled out,
scored and buffered as ``steps_per_generation`` micro-batches that the next micro-steps train on.

Launch: ``accelerate launch align/grpo.py --config recipes/grpo_ocr.yaml``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trl.trainer.utils import RepeatSampler

from qwen_image import QwenImage

from ..configs import QwenImageTrainingConfig
from ..data.prompts import collate_prompts, load_prompt_dataset
from ..reference import ReferenceModel
from .base import QwenImageTrainer
from .grpo_objective import GRPOArguments, GRPOObjective, build_reward, precompute_prompts_and_release

logger = logging.getLogger(__name__)


@dataclass
class GRPOConfig(GRPOArguments, QwenImageTrainingConfig):
    """Flow-GRPO settings. Defaults follow flow_grpo (lr 3e-4 LoRA, eps 1e-4, a 0.7, 10 steps, 99% of steps trained)."""

    beta: float = field(default=0.0, metadata={"help": "KL weight to the frozen reference (flow_grpo: 0.04 OCR/GenEval, 0.01 PickScore; 0 = no reference forward)."})
    learning_rate: float = field(default=3e-4, metadata={"help": "flow_grpo's LoRA learning rate."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (flow_grpo)."})
    resolution: int = field(default=512, metadata={"help": "Rollout resolution in px (flow_grpo trains Qwen-Image at 512)."})

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        self._validate_grpo()


class GRPOTrainer(QwenImageTrainer):
    """Flow-GRPO on a Qwen-Image bundle; ``train_dataset`` rows hold ``prompt`` plus columns the rewards read."""

    def __init__(self, qwen: QwenImage, args: GRPOConfig, train_dataset, reward_fn=None, **kwargs):
        if qwen.text_encoder is None or qwen.vae is None:
            raise ValueError("GRPO needs the text encoder (new prompts) and the VAE (images for the rewards).")
        unique = args.generation_batch_size // args.num_generations
        if train_dataset is not None and len(train_dataset) < unique:
            raise ValueError(f"the prompt set has {len(train_dataset)} prompts; a generation batch needs {unique} distinct ones.")
        super().__init__(qwen, args, train_dataset=train_dataset, data_collator=collate_prompts, **kwargs)
        policy = self.model  # not wrapped yet: the reference must see the bare transformer
        reference = ReferenceModel.from_policy(policy, args.finetune, args.init_adapter).prepare(self.accelerator) if args.beta > 0 else None
        self.grpo = GRPOObjective(qwen, args, reward_fn or build_reward(args), self.accelerator, reference, need_kl=args.beta > 0)
        self._step = 0
        self._buffered: list | None = None
        qwen.vae.to(self.accelerator.device)
        prompts = train_dataset["prompt"] if train_dataset is not None else []
        precompute_prompts_and_release(qwen, args, prompts, self.accelerator.device)

    # ------------------------------------------------------------------ data: TRL's generation-batch layout
    def get_train_dataloader(self):
        return self._get_dataloader(
            dataset=self.train_dataset, description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler, is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        dataset = dataset if dataset is not None else self.train_dataset
        return RepeatSampler(
            data_source=dataset, mini_repeat_count=self.args.num_generations,
            batch_size=self.args.generation_batch_size // self.args.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=True, seed=self.args.seed,
        )

    def _prepare_inputs(self, generation_batch: dict[str, list]) -> Any:
        if not self.model.training:
            raise ValueError("GRPOTrainer has no evaluation loop; set eval_strategy='no'.")
        every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % every == 0 or self._buffered is None:
            self._buffered = self.generate(generation_batch)
        return self._buffered[self._step % self.args.steps_per_generation]

    def generate(self, generation_batch: dict[str, list]) -> list:
        """Roll out the local generation batch into ``steps_per_generation`` scored micro-batches."""
        prompts = list(generation_batch["prompt"])
        policy = self.accelerator.unwrap_model(self.model)
        chunks = self.grpo.rollout(policy, prompts, generation_batch)
        if len(chunks) != self.args.steps_per_generation:
            raise ValueError(f"got {len(chunks)} rollout micro-batches for steps_per_generation={self.args.steps_per_generation}")
        return chunks

    def training_step(self, model, inputs, num_items_in_batch=None):
        out = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return out

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy_loss, kl = self.grpo.loss(model, inputs)
        loss = policy_loss if kl is None else policy_loss + self.args.beta * kl
        self.grpo.metrics["loss"].append(float(loss.detach()))
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update({k: v for k, v in self.grpo.pop_metrics().items() if v is not None})
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


def main(argv: Sequence[str] | None = None) -> GRPOTrainer:
    """``python align/grpo.py --config recipe.yaml [--key value ...]``."""
    from ..launch import parse_config, prepare_run
    from ..modeling import load_qwen_image

    args = parse_config(GRPOConfig, argv)
    prepare_run(args)  # output_dir / resume checks before anything loads
    dataset = load_prompt_dataset(args.dataset_name, args.train_prompts, args.dataset_split, args.prompt_column)
    reward_fn = build_reward(args)
    qwen = load_qwen_image(args)
    trainer = GRPOTrainer(qwen, args, train_dataset=dataset, reward_fn=reward_fn)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: rewards, ratios, KL per logged step
    if trainer.accelerator.is_main_process:
        logger.info("adapter saved to %s", Path(args.output_dir).resolve())
    return trainer
