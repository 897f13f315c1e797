"""The combined objective ``L = w_dpo * L_DPO + w_grpo * L_GRPO + beta_kl * KL (+ w_sft * L_FM)``.

The DPO term (and its velocity-form KL, and SFT) runs on offline preference pairs exactly as ``FlowDPOTrainer``
does; the GRPO term runs on online SDE rollouts of a separate prompt set, with its KL in closed form per step
(``kl_rollout``, weighted by the same ``beta_kl``). One frozen reference serves DPO and both KL terms. Each term is
logged apart (``loss/dpo``, ``loss/grpo``, ``loss/kl``, ``loss/kl_rollout``; GRPO statistics under ``grpo/``).
``w_grpo = 0`` is plain Flow-DPO; ``w_dpo = beta_kl = 0`` is plain Flow-GRPO on the rollouts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import set_seed
from trl.trainer.utils import RepeatSampler

from ..data.prompts import collate_prompts, load_prompt_dataset
from .dpo import DPOConfig, FlowDPOTrainer, load_model_and_pairs, train_and_save
from .grpo import log_rollout_images
from .grpo_objective import GRPOArguments, GRPOObjective, build_reward, precompute_prompts_and_release

logger = logging.getLogger(__name__)


@dataclass
class DPOGRPOConfig(GRPOArguments, DPOConfig):
    """Flow-DPO settings plus the GRPO ones; ``dataset_name`` holds the pairs, ``grpo_dataset_name`` the prompts."""

    grpo_dataset_name: str | None = field(
        default=None, metadata={"help": "Prompts for the GRPO term (.jsonl with 'prompt' + reward columns); or train_prompts."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.w_grpo > 0:
            self._validate_grpo()


class PromptStream:
    """Endless generation batches of GRPO prompts for this process, laid out as TRL's RepeatSampler lays them
    over processes (same seed everywhere; each rank takes its slice), so groups are whole across the gather."""

    def __init__(self, dataset, args: DPOGRPOConfig, process_index: int):
        self.dataset = dataset
        self.global_size = args.generation_batch_size
        self.local_size = self.global_size // args.world_size
        self.rank = process_index
        unique = self.global_size // args.num_generations
        if len(dataset) < unique:
            raise ValueError(f"the GRPO prompt set has {len(dataset)} prompts; a generation batch needs {unique} distinct ones.")
        self.sampler = RepeatSampler(dataset, mini_repeat_count=args.num_generations, batch_size=unique,
                                     repeat_count=1, shuffle=True, seed=args.seed)
        self._iter = iter(self.sampler)

    def _take(self) -> list[int]:
        out = []
        while len(out) < self.global_size:
            try:
                out.append(next(self._iter))
            except StopIteration:  # a new epoch over the prompts (RepeatSampler reshuffles)
                self._iter = iter(self.sampler)
        return out

    def next(self) -> dict[str, list]:
        idx = self._take()[self.rank * self.local_size:(self.rank + 1) * self.local_size]
        return collate_prompts([self.dataset[i] for i in idx])


class DPOGRPOTrainer(FlowDPOTrainer):
    """Flow-DPO on pairs + Flow-GRPO on rollouts of ``grpo_prompts``, one frozen reference."""

    def __init__(self, qwen, args: DPOGRPOConfig, train_dataset=None, grpo_prompts=None, reward_fn=None, **kwargs):
        super().__init__(qwen, args, train_dataset=train_dataset, **kwargs)
        self.grpo: GRPOObjective | None = None
        self._grpo_step = 0
        self._buffered: list | None = None
        if args.w_grpo > 0:
            if grpo_prompts is None:
                raise ValueError("w_grpo > 0 needs GRPO prompts: set grpo_dataset_name or train_prompts.")
            if qwen.text_encoder is None or qwen.vae is None:
                raise ValueError("the GRPO term needs the text encoder (prompts) and the VAE (images for the rewards).")
            self.grpo = GRPOObjective(qwen, args, reward_fn or build_reward(args), self.accelerator, self.reference,
                                      need_kl=args.beta_kl > 0)
            self._prompts = PromptStream(grpo_prompts, args, self.accelerator.process_index)
            precompute_prompts_and_release(qwen, args, grpo_prompts["prompt"], self.accelerator.device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        out = super().training_step(model, inputs, num_items_in_batch)
        self._grpo_step += 1
        return out

    def next_rollout_batch(self):
        """The rollout micro-batch of this micro-step (a new buffer every steps_per_generation * num_iterations)."""
        every = self.args.steps_per_generation * self.args.num_iterations
        if self._grpo_step % every == 0 or self._buffered is None:
            prompts = self._prompts.next()
            policy = self.accelerator.unwrap_model(self.model)
            self._buffered = self.grpo.rollout(policy, list(prompts["prompt"]), prompts)
        return self._buffered[self._grpo_step % self.args.steps_per_generation]

    def extra_loss_terms(self, model, inputs: dict) -> tuple[dict, dict]:
        if self.grpo is None or not model.training:
            return {}, {}
        policy_loss, kl = self.grpo.loss(model, self.next_rollout_batch())
        terms: dict[str, tuple[float, torch.Tensor]] = {"grpo": (self.args.w_grpo, policy_loss)}
        if kl is not None:
            terms["kl_rollout"] = (self.args.beta_kl, kl)
        metrics = {f"grpo/{k}": torch.tensor(v) for k, v in self.grpo.pop_metrics().items() if v is not None}
        return terms, metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.grpo is not None:
            log_rollout_images(self.args, self.grpo, self.state.global_step, self.accelerator.is_main_process)


def main(argv: Sequence[str] | None = None) -> Any:
    """``accelerate launch align/dpo.py --config recipes/dpo_grpo.yaml``: Flow-DPO, plus GRPO when ``w_grpo > 0``."""
    from ..launch import parse_config, prepare_run
    from .base import release_text_encoder

    config = parse_config(DPOGRPOConfig, argv)
    prepare_run(config)  # output_dir / resume checks before anything loads
    set_seed(config.seed)
    prompts = None
    if config.w_grpo > 0:
        prompts = load_prompt_dataset(config.grpo_dataset_name, config.train_prompts, "train", config.prompt_column)
        build_reward(config)  # fail on a bad reward name before loading the model
    qwen, train_ds, eval_ds = load_model_and_pairs(config)
    if config.w_grpo > 0:
        trainer = DPOGRPOTrainer(qwen, config, train_dataset=train_ds, eval_dataset=eval_ds, grpo_prompts=prompts)
    else:
        trainer = FlowDPOTrainer(qwen, config, train_dataset=train_ds, eval_dataset=eval_ds)
        release_text_encoder(qwen)  # plain DPO trains on cached embeddings only
    return train_and_save(trainer, config)
