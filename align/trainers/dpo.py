"""Flow-DPO trainer: preference pairs, shared noise and sigma for winner and loser, a frozen reference.

``compute_loss`` is a weighted sum of named terms, ``L = w_dpo * L_DPO + beta_kl * KL + w_sft * L_FM`` plus whatever
a subclass's ``extra_loss_terms`` adds (the combined objective adds its online and KTO terms there; this trainer
knows none of them). On DPO batches KL is the velocity form ``mean ||v_theta - v_ref||^2`` (docs/math.md) and the
SFT term is flow matching on the chosen image; both reuse the forwards DPO already made. Every term is logged
separately (``loss/<name>``): their scales differ by orders of magnitude.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from qwen_image.errors import UserError

from ..configs.dpo import DPOConfig
from ..data.edit import collate_edit
from ..data.encoding import collate_encoded
from ..data.preference import IMAGE_COLUMNS
from ..losses import flow_dpo_loss, flow_matching_loss, make_noisy, sample_sigmas, velocity_error
from ..reference import ReferenceModel
from .base import MetricLog, QwenImageTrainer

logger = logging.getLogger(__name__)

LATENT_COLUMNS = tuple(f"{c}_latents" for c in IMAGE_COLUMNS)


class FlowDPOTrainer(QwenImageTrainer):
    """Flow-DPO on cached preference pairs (``chosen_latents``, ``rejected_latents``, ``prompt_embeds``)."""

    evaluate_after_training = True  # held-out implicit accuracy of the final weights (eval_fraction > 0)
    loss_weight_names: tuple[str, ...] = ("w_dpo", "beta_kl", "w_sft")  # named when every weight is 0

    def __init__(self, qwen, args: DPOConfig, train_dataset=None, **kwargs):
        # Edit models: batches also carry the pairs' shared ``references`` (both images edit the same sources).
        collate = collate_edit if qwen.edit_model else collate_encoded
        kwargs.setdefault("data_collator", partial(collate, latent_columns=LATENT_COLUMNS))
        super().__init__(qwen, args, train_dataset=train_dataset, **kwargs)
        # self.model is still the bare transformer here (wrapping happens in train()): build the reference now.
        self.reference = ReferenceModel.from_policy(
            self.model, args.finetune, init_adapter=args.init_adapter, offload=args.reference_offload,
            velocity_fn=qwen.predict_velocity,
        ).prepare(self.accelerator)
        self.metric_log = MetricLog(self.accelerator)
        self._eval_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ the objective
    def dpo_terms(self, model, inputs: dict, generator: torch.Generator | None = None) -> tuple[dict, dict]:
        """Forward winner and loser with the same noise and sigma through policy and reference.

        Returns ``(terms, metrics)``: ``terms[name] = (weight, loss tensor)`` for dpo, kl, sft.
        """
        args = self.args
        x_w, x_l = inputs["chosen_latents"], inputs["rejected_latents"]
        batch, seq_len = x_w.shape[0], x_w.shape[1]
        device = x_w.device
        noise = torch.randn(x_w.shape, generator=generator, dtype=torch.float32).to(device)
        sigma = sample_sigmas(batch, args.timestep_sampling, image_seq_len=seq_len, logit_mean=args.logit_mean,
                              logit_std=args.logit_std, mode_scale=args.mode_scale, scheduler=self.qwen.scheduler,
                              generator=generator, device=device)
        # Winner and loser in one 2B batch: one forward each for policy and reference, identical noise and sigma.
        x0 = torch.cat([x_w, x_l]).float()
        noisy, target = make_noisy(x0, noise.repeat(2, 1, 1), sigma.repeat(2))
        sigma2 = sigma.repeat(2)
        embeds = inputs["prompt_embeds"].repeat(2, 1, 1)
        mask = inputs["prompt_mask"].repeat(2, 1) if inputs.get("prompt_mask") is not None else None
        h, w = int(inputs["height"]), int(inputs["width"])
        refs = inputs["references"].repeat(2) if inputs.get("references") is not None else None
        slots = inputs["img_mask"].repeat(2, 1) if inputs.get("img_mask") is not None else None
        # Policy first: FSDP2's lazy init must see trainable parameters on the first forward (reference.py).
        v_pol = self.velocity(model, noisy, sigma2, embeds, mask, h, w, references=refs, img_mask=slots)
        with torch.no_grad(), self.reference.active() as ref_module:
            v_ref = self.velocity(ref_module, noisy, sigma2, embeds, mask, h, w, references=refs, img_mask=slots)
        err_pol, err_ref = velocity_error(v_pol, target), velocity_error(v_ref, target)
        dpo, metrics = flow_dpo_loss(err_pol[:batch], err_pol[batch:], err_ref[:batch], err_ref[batch:],
                                     beta=args.beta, loss_type=args.loss_type)
        kl = velocity_error(v_pol, v_ref.detach()).mean()
        terms = {"dpo": (args.w_dpo, dpo), "kl": (args.beta_kl, kl)}
        if args.w_sft > 0:
            terms["sft"] = (args.w_sft, flow_matching_loss(v_pol[:batch], target[:batch], sigma, args.loss_weighting))
        metrics["sigma"] = sigma.mean()
        return terms, metrics

    def extra_loss_terms(self, model, inputs: dict) -> tuple[dict, dict]:
        """Hook for the combined objective: more ``name -> (weight, loss)`` terms and metrics."""
        return {}, {}

    @property
    def dpo_weights_active(self) -> bool:
        """Whether any term computed from the pairs has a weight (otherwise their forwards are skipped in training)."""
        return any(w > 0 for w in (self.args.w_dpo, self.args.beta_kl, self.args.w_sft))

    def weighted_loss(self, terms: dict, metrics: dict, mode: str) -> torch.Tensor:
        """``sum(weight * term)`` over the weighted terms; every term (weighted or not) and metric is logged."""
        weighted = [weight * value for weight, value in terms.values() if weight]
        loss = sum(weighted[1:], weighted[0]) if weighted else next(iter(terms.values()))[1] * 0.0
        for name, (_, value) in terms.items():
            metrics[f"loss/{name}"] = value
        self.metric_log.add({k: float(v.detach()) if torch.is_tensor(v) else v for k, v in metrics.items()}, mode)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        terms, metrics = {}, {}
        if mode == "eval" or self.dpo_weights_active:
            generator = self._eval_generator if mode == "eval" else None
            terms, metrics = self.dpo_terms(model, inputs, generator=generator)
        extra_terms, extra_metrics = self.extra_loss_terms(model, inputs)
        terms.update(extra_terms)
        metrics.update(extra_metrics)
        if not terms:
            raise UserError(f"every loss weight is 0 ({', '.join(self.loss_weight_names)}): nothing to train.")
        loss = self.weighted_loss(terms, metrics, mode)
        return (loss, {}) if return_outputs else loss

    # ------------------------------------------------------------------ evaluation: held-out implicit accuracy
    def evaluate(self, *args, **kwargs):
        # Same noise and sigmas at every evaluation, so eval metrics compare across steps.
        self._eval_generator = torch.Generator().manual_seed(self.args.seed)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._eval_generator = None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{name}": value for name, value in self.metric_log.pop(mode).items()})
        super().log(logs, start_time)
