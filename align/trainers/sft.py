"""Supervised fine-tuning (flow matching) of the Qwen-Image transformer, LoRA or full, on rater-filtered data.

Data path: load (imagefolder / datasets) -> rater filter -> row checks -> cache text embeddings + VAE latents per
training resolution (aspect-ratio buckets, optional flipped copies) -> text encoder released -> bucket batches,
optionally switched by a progressive phase schedule.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from datasets import Dataset, concatenate_datasets
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from qwen_image import QwenImage

from ..configs.sft import SFTConfig
from ..data.buckets import BucketBatchSampler, BucketSizeFn
from ..data.edit import collate_edit
from ..data.encoding import collate_encoded, encode_dataset, tensor_format
from ..data.loading import load_image_dataset, validate_rows
from ..data.ratings import filter_by_ratings
from ..data.report import RowReport
from ..data.schedule import PhaseSchedule
from ..errors import UserError
from ..losses import flow_matching_loss, make_noisy, sample_sigmas
from ..modeling import model_identity
from .base import QwenImageTrainer

logger = logging.getLogger(__name__)
# The empty caption trained under caption dropout: the pipeline's usual negative prompt, so CFG sees what it learnt.
EMPTY_PROMPT = " "


@dataclass
class SFTData:
    dataset: Dataset  # cached rows: prompt_embeds, <image>_latents, height, width, + metadata columns
    pools: dict  # (resolution, source) -> (height, width) -> units (lists of interchangeable row indices)
    summary: RowReport
    empty_prompt: torch.Tensor | None  # (L, D) embedding of EMPTY_PROMPT for caption dropout
    edit: bool = False  # rows carry reference latents (edit models): batches get ``references``


def _is_synthetic(value, synthetic_values: Sequence[str]) -> bool:
    return str(value) in set(synthetic_values)


def load_sft_rows(config: SFTConfig) -> tuple[Dataset, RowReport]:
    """Load, rater-filter and check the training rows (no model needed: data mistakes surface before it loads)."""
    raw = load_image_dataset(config.dataset_name, config.dataset_split, config.image_column)
    raw, rated = filter_by_ratings(raw, config.min_score, config.min_raters, config.rating_aggregate,
                                   config.rating_scale, config.ratings_column, config.skip_bad_rows)
    if len(raw) == 0:  # every row filtered out by the ratings: say so before the row checks touch the images
        raise UserError(f"no training rows left ({_dropped(rated)}); lower min_score/min_raters or fix the ratings")
    raw, checked = validate_rows(raw, [config.image_column], config.prompt_column, config.skip_bad_rows)
    summary = rated.merge(checked)
    if len(raw) == 0:
        raise UserError(f"no training rows left ({_dropped(summary)}); fix the data or the filter settings")
    return raw, summary


def _dropped(summary: RowReport) -> str:
    reasons = summary.dropped_text() or "none dropped"
    return f"{summary.total} rows, {reasons}" + (f"; filter: {summary.settings}" if summary.settings else "")


def prepare_sft_data(config: SFTConfig, qwen: QwenImage, rows: tuple[Dataset, RowReport] | None = None) -> SFTData:
    """Load (unless ``rows`` from :func:`load_sft_rows` are given), filter, check and cache the training data (the
    text encoder and VAE must still be loaded). Edit models read instruction / target / control-image rows."""
    if qwen.edit_model:
        from .edit_sft import prepare_edit_sft_data

        return prepare_edit_sft_data(config, qwen)
    raw, summary = rows if rows is not None else load_sft_rows(config)
    if any(p.synthetic_fraction is not None for p in config.phase_list) and config.source_column not in raw.column_names:
        raise UserError(f"phases set synthetic_fraction but the dataset has no {config.source_column!r} column.")

    n = len(raw)
    raw = raw.add_column("unit", list(range(n)))
    flip_column = None
    if config.random_flip:
        flip_column = "flip"
        raw = concatenate_datasets([raw.add_column("flip", [False] * n), raw.add_column("flip", [True] * n)])

    resolutions = sorted({p.resolution for p in config.phase_list}) or [config.resolution]
    parts = []
    for res in resolutions:
        size_fn = BucketSizeFn(res, config.bucket_aspect_ratios) if config.aspect_ratio_buckets else None
        parts.append(encode_dataset(raw, qwen, model_identity(config), config.encoding_cache_dir,
                                    image_columns=[config.image_column], prompt_column=config.prompt_column,
                                    resolution=res, size_fn=size_fn, flip_column=flip_column,
                                    batch_size=config.encode_batch_size))

    pools: dict = {}
    # The first pool sets the epoch length: the run's first phase (or the only resolution).
    first_res = config.phase_list[0].resolution if config.phase_list else config.resolution
    offset = 0
    for res, part in sorted(zip(resolutions, parts), key=lambda rp: rp[0] != first_res):
        cols = ["height", "width", "unit"] + ([config.source_column] if config.source_column in part.column_names else [])
        meta = part.select_columns(cols).with_format(None).to_dict()
        units: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for i in range(len(part)):
            bucket = (int(meta["height"][i]), int(meta["width"][i]))
            sources = ["all"]
            if config.source_column in meta:
                sources.append("synthetic" if _is_synthetic(meta[config.source_column][i], config.synthetic_values) else "real")
            for src in sources:
                units[src][bucket][meta["unit"][i]].append(offset + i)
        for src in units:
            pools[(res, src)] = {b: list(u.values()) for b, u in units[src].items()}
        offset += len(part)
    for i, p in enumerate(config.phase_list):
        if p.synthetic_fraction and (p.resolution, "synthetic") not in pools:
            raise UserError(f"phase {i} asks for synthetic_fraction {p.synthetic_fraction:g} but no row has "
                             f"{config.source_column} in {config.synthetic_values}.")
        if p.synthetic_fraction is not None and p.synthetic_fraction < 1 and (p.resolution, "real") not in pools:
            raise UserError(f"phase {i} asks for real rows but every row is synthetic.")

    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    latent = f"{config.image_column}_latents"
    dataset = tensor_format(dataset, [latent])

    empty = None
    if config.caption_dropout > 0:
        with torch.no_grad():
            embeds, mask = qwen.encode_prompt([EMPTY_PROMPT])
        empty = embeds[0, : int(mask[0].sum())].float().cpu()
    return SFTData(dataset, pools, summary, empty)


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
                             int(inputs["height"]), int(inputs["width"]), references=inputs.get("references"))
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


def write_data_summary(config: SFTConfig, summary: RowReport, is_main: bool) -> None:
    """Print the kept/dropped summary and keep it next to the run (``data_summary.json``)."""
    logger.info("%s", summary)
    if not is_main:
        return
    print(summary, flush=True)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    Path(config.output_dir, "data_summary.json").write_text(json.dumps(
        {**summary.to_dict(), "world_size": config.world_size}, indent=2))
