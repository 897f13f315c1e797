"""Diffusion-KTO trainer: per-image desirable / undesirable labels from raters, a frozen reference.

Each step draws one noise and one sigma per image, runs the policy (with graph) and the frozen reference (without)
on the same noisy latents, and turns the two velocity errors into the KTO loss (:func:`align.losses.kto_loss`): the
implicit reward ``g = e_ref - e_policy`` is pushed above the reference point for desirable images and below it for
undesirable ones. The reference point (``kl_estimate``) is the batch mean of ``g`` (the paper's), the same mean on
prompts shifted by one inside the batch (TRL's mismatched-pair estimate), or 0; it is detached and averaged over
processes.

:class:`KTOTerm` is the objective on one batch, shared by :class:`KTOTrainer` and the combined objective's KTO
term (``w_kto``), which draws its batches from :class:`RatedBatchSource` beside the DPO pairs.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from ..configs.kto import KTOConfig
from ..data.edit import collate_edit
from ..data.encoding import collate_encoded
from ..data.kto import LABEL_COLUMN
from ..losses import kto_loss, make_noisy, sample_sigmas, velocity_error
from ..reference import ReferenceModel
from .base import MetricLog, QwenImageTrainer

logger = logging.getLogger(__name__)


def latent_column(args: Any) -> str:
    return f"{args.image_column}_latents"


def rated_collator(edit: bool, args: Any) -> Callable[[list[dict]], dict]:
    return partial(collate_edit if edit else collate_encoded, latent_columns=(latent_column(args),))


class KTOTerm:
    """The Diffusion-KTO loss of one batch of cached rated images (``<image>_latents``, ``prompt_embeds``,
    ``desirable``; edit: ``references``) under ``trainer``'s velocity call and a frozen ``reference``."""

    def __init__(self, trainer: QwenImageTrainer, reference: ReferenceModel, beta: float, desirable_weight: float,
                 undesirable_weight: float, kl_estimate: str):
        self.trainer, self.reference = trainer, reference
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.kl_estimate = kl_estimate

    def _mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        return self.trainer.accelerator.reduce(value, reduction="mean")

    def __call__(self, model, inputs: dict, generator: torch.Generator | None = None, shared_noise: bool = False
                 ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """(loss, metrics, implicit reward g (B,) detached, labels (B,) bool). ``shared_noise``: every image of the
        batch at the same noise and sigma (otherwise one draw per image)."""
        trainer, args = self.trainer, self.trainer.args
        x0 = inputs[latent_column(args)].float()
        batch, seq_len, device = x0.shape[0], x0.shape[1], x0.device
        desirable = torch.as_tensor(inputs[LABEL_COLUMN], dtype=torch.bool, device=device).view(batch)
        draws = 1 if shared_noise else batch
        noise = torch.randn((draws, *x0.shape[1:]), generator=generator, dtype=torch.float32).to(device)
        sigma = sample_sigmas(draws, args.timestep_sampling, image_seq_len=seq_len, logit_mean=args.logit_mean,
                              logit_std=args.logit_std, mode_scale=args.mode_scale, scheduler=trainer.qwen.scheduler,
                              generator=generator, device=device)
        noise, sigma = noise.expand_as(x0), sigma.expand(batch)
        noisy, target = make_noisy(x0, noise, sigma)
        embeds, mask = inputs["prompt_embeds"], inputs.get("prompt_mask")
        h, w = int(inputs["height"]), int(inputs["width"])
        refs, slots = inputs.get("references"), inputs.get("img_mask")
        # Policy first: FSDP2's lazy init must see trainable parameters on the first forward (align/reference.py).
        v_pol = trainer.velocity(model, noisy, sigma, embeds, mask, h, w, references=refs, img_mask=slots)
        with torch.no_grad(), self.reference.active() as ref_module:
            v_ref = trainer.velocity(ref_module, noisy, sigma, embeds, mask, h, w, references=refs, img_mask=slots)
        err_pol, err_ref = velocity_error(v_pol, target), velocity_error(v_ref, target)
        offset = None
        if self.kl_estimate == "none":
            offset = 0.0
        elif self.kl_estimate == "mismatched":
            offset = self._mismatched_offset(model, noisy, sigma, target, embeds, mask, h, w, refs, slots)
        loss, metrics = kto_loss(err_pol, err_ref, desirable, beta=self.beta, desirable_weight=self.desirable_weight,
                                 undesirable_weight=self.undesirable_weight, kl_offset=offset,
                                 all_reduce_mean=self._mean_over_processes)
        metrics["sigma"] = sigma.mean()
        reward = -(err_pol.detach() - err_ref.detach())
        return loss, metrics, reward, desirable

    @torch.no_grad()
    def _mismatched_offset(self, model, noisy, sigma, target, embeds, mask, h, w, refs, slots=None) -> torch.Tensor:
        """TRL's KL estimate: the implicit reward of each image under the NEXT row's prompt (and control images),
        averaged over the batch and the processes, clamped at 0; no gradient."""
        trainer = self.trainer
        embeds = embeds.roll(1, 0)
        mask = mask.roll(1, 0) if mask is not None else None
        if refs is not None:
            refs = type(refs)(refs.latents.roll(1, 0), refs.shapes)
        slots = slots.roll(1, 0) if slots is not None else None
        v_pol = trainer.velocity(model, noisy, sigma, embeds, mask, h, w, references=refs, img_mask=slots)
        with self.reference.active() as ref_module:
            v_ref = trainer.velocity(ref_module, noisy, sigma, embeds, mask, h, w, references=refs, img_mask=slots)
        g = velocity_error(v_ref, target) - velocity_error(v_pol, target)
        return self._mean_over_processes(g.mean()).clamp_min(0)


class KTOTrainer(QwenImageTrainer):
    """Diffusion-KTO on cached rated images. Logs TRL's KTO names: ``rewards/desirable``, ``rewards/undesirable``
    (mean ``beta * g`` per class), ``rewards/margins``, ``rewards/accuracies``, ``kl``; on the held-out split
    ``eval_rewards/accuracies`` is the implicit accuracy over the WHOLE split with one reference point (the
    held-out mean reward), so it does not depend on how the split falls into batches."""

    evaluate_after_training = True  # held-out implicit accuracy of the final weights (eval_fraction > 0)

    def __init__(self, qwen, args: KTOConfig, train_dataset=None, **kwargs):
        kwargs.setdefault("data_collator", rated_collator(qwen.edit_model, args))
        super().__init__(qwen, args, train_dataset=train_dataset, **kwargs)
        # self.model is still the bare transformer here (wrapping happens in train()): build the reference now.
        self.reference = ReferenceModel.from_policy(
            self.model, args.finetune, init_adapter=args.init_adapter, offload=args.reference_offload
        ).prepare(self.accelerator)
        self.kto = KTOTerm(self, self.reference, args.beta, args.desirable_weight, args.undesirable_weight,
                           args.kl_estimate)
        self.metric_log = MetricLog(self.accelerator)
        self._eval_rewards: list[tuple[torch.Tensor, torch.Tensor]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        if mode == "train":
            loss, metrics, _, _ = self.kto(model, inputs, shared_noise=self.args.shared_noise)
        else:
            # Every held-out image at the same eval_noise_draws (noise, sigma) draws, the same at every
            # evaluation: the held-out rewards then differ by image, not by draw, and compare across steps.
            generator = torch.Generator().manual_seed(self.args.seed)
            rewards = []
            for _ in range(self.args.eval_noise_draws):
                loss, metrics, reward, desirable = self.kto(model, inputs, generator=generator, shared_noise=True)
                rewards.append(reward)
            self._eval_rewards.append((torch.stack(rewards).mean(0).float().cpu(), desirable.cpu()))
        metrics["loss/kto"] = loss
        self.metric_log.add({k: float(v.detach()) if torch.is_tensor(v) else v for k, v in metrics.items()}, mode)
        return (loss, {}) if return_outputs else loss

    # ------------------------------------------------------------------ evaluation: held-out implicit accuracy
    def evaluate(self, *args, **kwargs):
        self._eval_rewards = []
        return super().evaluate(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def held_out_accuracy(self) -> dict[str, float]:
        """Implicit accuracy over every held-out image of every process: ``s * (g - z) > 0`` with ``z = max(0,
        mean g)`` of the whole split (the per-batch reference point of training would depend on the batching)."""
        if not self._eval_rewards:
            return {}
        reward = torch.cat([r for r, _ in self._eval_rewards]).double()
        label = torch.cat([d for _, d in self._eval_rewards]).double()
        self._eval_rewards = []
        local = torch.stack([reward, label], dim=1).to(self.accelerator.device)
        padded = self.accelerator.pad_across_processes(local, dim=0, pad_index=math.nan)
        every = self.accelerator.gather(padded).cpu().numpy()
        every = every[~np.isnan(every[:, 0])]
        g, is_good = every[:, 0], every[:, 1] > 0.5
        z = max(0.0, float(g.mean()))
        sign = np.where(is_good, 1.0, -1.0)
        return {"rewards/accuracies": float(np.mean(sign * (g - z) > 0)), "kl": z}

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        values = self.metric_log.pop(mode)
        if mode == "eval":
            values.update(self.held_out_accuracy())
        logs.update({f"{prefix}{name}": value for name, value in values.items()})
        super().log(logs, start_time)


class RatedBatchSource:
    """Batches of cached rated images for a term that trains beside another dataset (the combined objective's KTO
    term): a seeded shuffle per epoch, each process its own slice of every global batch. Its position is saved in
    checkpoints (``QwenImageTrainer.checkpoint_states``), so a resumed run draws the same batches."""

    def __init__(self, dataset, batch_size: int, collate: Callable[[list[dict]], dict], seed: int,
                 process_index: int = 0, num_processes: int = 1):
        if len(dataset) < batch_size * num_processes:
            raise ValueError(f"{len(dataset)} rated images cannot fill a batch of {batch_size} on each of "
                             f"{num_processes} process(es)")
        self.dataset, self.batch_size, self.collate, self.seed = dataset, batch_size, collate, seed
        self.rank, self.world = process_index, num_processes
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))

    def next_batch(self) -> dict:
        span = self.batch_size * self.world
        if self.position + span > len(self.dataset):  # drop the incomplete tail: every batch is full on every rank
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order()[self.position:self.position + span]
        self.position += span
        mine = order[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return self.collate([self.dataset[int(i)] for i in mine])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
