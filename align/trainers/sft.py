"""Supervised fine-tuning (flow matching) of the Qwen-Image transformer, LoRA or full, T2I or edit.

The data (rater filter, row checks, cached latents and embeddings, bucket pools) comes prepared from
:mod:`align.data.sft`; this trainer batches it from the bucket pools, optionally switched by a progressive phase
schedule. Edit batches carry ``references``, which the velocity call passes through, so the loss is the same.
"""

from __future__ import annotations

import hashlib
from functools import partial

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from qwen_image import QwenImage
from qwen_image.errors import UserError

from ..configs.sft import SFTConfig
from ..data.buckets import BucketBatchSampler
from ..data.edit import collate_edit
from ..data.encoding import collate_encoded
from ..data.schedule import PhaseSchedule
from ..data.sft import SFTData
from ..losses import flow_matching_loss, make_noisy, sample_sigmas
from .base import QwenImageTrainer


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class SFTTrainer(QwenImageTrainer):
    """Flow-matching SFT: ``w(s) * ||v(x_s, s, c) - (eps - x0)||^2`` on cached latents.

    Noise, sigma and caption dropout come from a generator seeded by (seed, step, rank, micro-batch): they do not
    depend on RNG state, so a resumed run repeats exactly what an uninterrupted one does.
    """

    def __init__(self, qwen: QwenImage, args: SFTConfig, data: SFTData, **kwargs):
        self.data = data
        self.schedule = PhaseSchedule(args.phase_list, args.max_steps, args.seed)
        self._latent_key = f"{args.image_column}_latents"
        self._micro = (-1, 0)
        self._pending_metrics = data.summary.metrics()
        self._batch_sampler: BucketBatchSampler | None = None
        collate = collate_edit if data.edit else collate_encoded
        super().__init__(qwen, args, train_dataset=data.dataset,
                         data_collator=partial(collate, latent_columns=[self._latent_key]), **kwargs)
        self.add_callback(_SamplerEpoch(self))

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        per_step = self.args.world_size * self.args.gradient_accumulation_steps
        choose = (lambda k: self.schedule.pool_for_batch(k, per_step)) if self.schedule.phases else None
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._batch_sampler = BucketBatchSampler(
            self.data.pools, self.args.per_device_train_batch_size, seed=seed,
            drop_last=self.args.dataloader_drop_last, choose_pool=choose, batches_per_step=per_step,
        )
        loader = DataLoader(self.train_dataset, batch_sampler=self._batch_sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------ LR phases
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if not self.schedule.phases or getattr(scheduler, "_phase_scaled", False):
            return scheduler
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise UserError(f"phase lr_scale needs a LambdaLR schedule; {self.args.lr_scheduler_type!r} is not one.")
        optimizer = optimizer or self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        scale = self.schedule.lr_scale
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lambda s, f=f: f(s) * scale(s) for f in scheduler.lr_lambdas])
        self.lr_scheduler._phase_scaled = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ loss
    def _generator(self) -> torch.Generator:
        step = self.state.global_step
        micro = self._micro[1] + 1 if self._micro[0] == step else 0
        self._micro = (step, micro)
        return torch.Generator().manual_seed(_seed_of(self.args.seed, step, self.args.process_index, micro))

    def _drop_captions(self, embeds: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor):
        empty = self.data.empty_prompt.to(embeds)
        length = max(embeds.shape[1], empty.shape[0])
        if length > embeds.shape[1]:
            embeds = torch.nn.functional.pad(embeds, (0, 0, 0, length - embeds.shape[1]))
            mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))
        embeds, mask = embeds.clone(), mask.clone()
        for i in torch.nonzero(drop).flatten().tolist():
            embeds[i].zero_()
            mask[i].zero_()
            embeds[i, : empty.shape[0]] = empty
            mask[i, : empty.shape[0]] = 1
        return embeds, mask

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        x0 = inputs[self._latent_key].float()
        batch = x0.shape[0]
        gen = self._generator()
        sigma = sample_sigmas(batch, args.timestep_sampling, image_seq_len=x0.shape[1], logit_mean=args.logit_mean,
                              logit_std=args.logit_std, mode_scale=args.mode_scale, scheduler=self.qwen.scheduler,
                              generator=gen)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        embeds, mask = inputs["prompt_embeds"], inputs["prompt_mask"]
        if args.caption_dropout > 0 and self.data.empty_prompt is not None:
            drop = torch.rand(batch, generator=gen) < args.caption_dropout
            if drop.any():
                embeds, mask = self._drop_captions(embeds, mask, drop)
        sigma = sigma.to(x0.device)
        noisy, target = make_noisy(x0, noise, sigma)
        pred = self.velocity(model, noisy, sigma, embeds.to(x0.device), mask.to(x0.device),
                             int(inputs["height"]), int(inputs["width"]), references=inputs.get("references"),
                             img_mask=inputs.get("img_mask"))
        loss = flow_matching_loss(pred, target, sigma, args.loss_weighting)
        return (loss, {"velocity": pred}) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._pending_metrics:  # the data summary goes out with the first log line (and to wandb)
            logs = {**self._pending_metrics, **logs}
            self._pending_metrics = {}
        if self.schedule.phases and "loss" in logs:
            logs["phase"] = float(self.schedule.phase_index(self.state.global_step))
        super().log(logs, *args, **kwargs)


class _SamplerEpoch(TrainerCallback):
    """Tell the batch sampler the epoch even on resume, where Trainer's skip wrapper hides it from set_epoch."""

    def __init__(self, trainer: SFTTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer._batch_sampler is not None:
            self.trainer._batch_sampler.set_epoch(int(state.epoch + 1e-6))

