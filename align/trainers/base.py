"""The shared Trainer: a ``transformers.Trainer`` over the Qwen-Image transformer with diffusers-format saving,
resume from our checkpoints, validation images, and the velocity call every objective uses."""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import TrainOutput, rotate_checkpoints

from qwen_image import QwenImage
from qwen_image.errors import UserError
from qwen_image.sampling import Conditioning, References, sample

from ..checkpoints import run_identity, write_manifest
from ..configs import QwenImageTrainingConfig
from ..export import LORA_WEIGHT_NAME, save_full, save_lora
from ..modeling import ADAPTER_NAME, prepare_transformer

logger = logging.getLogger(__name__)

# A checkpoint is written under this prefix and renamed when complete (``--resume_from_checkpoint last`` skips it).
STAGING_PREFIX = ".incomplete-"
# Per-rank state of ``QwenImageTrainer.checkpoint_states`` entries inside a checkpoint ("rollout" -> rollout_state_0.pt).
CHECKPOINT_STATE_NAME = "{name}_state_{rank}.pt"


class MetricLog:
    """Training metrics averaged over every rank and every micro-step between two log lines: the one path every
    trainer logs through. ``add`` is a collective (each rank calls it with the same names); names ending in
    ``/min`` or ``/max`` reduce with min / max over ranks, the others with the NaN-ignoring mean."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.values: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def add(self, metrics: Mapping[str, float | torch.Tensor | None], mode: str = "train") -> None:
        names = sorted(metrics)
        if not names:
            return
        local = torch.tensor([math.nan if metrics[n] is None else float(metrics[n]) for n in names],
                             dtype=torch.float64, device=self.accelerator.device)
        every = self.accelerator.gather(local[None]).cpu()  # (ranks, names)
        for i, name in enumerate(names):
            col = every[:, i]
            col = col[~torch.isnan(col)]
            if not col.numel():
                value = math.nan
            elif name.endswith("/min"):
                value = float(col.min())
            elif name.endswith("/max"):
                value = float(col.max())
            else:
                value = float(col.mean())
            self.values[mode][name].append(value)

    def pop(self, mode: str = "train") -> dict[str, float]:
        """The averages since the last pop (min / max over steps for those names); names with no valid value are left out."""
        out = {}
        for name, vals in self.values[mode].items():
            valid = [v for v in vals if not math.isnan(v)]
            if valid:
                out[name] = min(valid) if name.endswith("/min") else max(valid) if name.endswith("/max") else sum(valid) / len(valid)
        self.values[mode].clear()
        return out


class QwenImageTrainer(Trainer):
    """Base for every objective. Subclasses implement ``compute_loss`` on cached batches."""

    def __init__(
        self,
        qwen: QwenImage,
        args: QwenImageTrainingConfig,
        train_dataset=None,
        data_collator=None,
        eval_dataset=None,
        callbacks: list[TrainerCallback] | None = None,
        **kwargs,
    ):
        self.qwen = qwen
        # Objects whose state a resumed run needs besides the Trainer's (e.g. an online term's rollout source):
        # name -> object with state_dict() / load_state_dict(); saved per rank in every checkpoint.
        self.checkpoint_states: dict[str, Any] = {}
        self._model_dtype: torch.dtype | None = None
        self._trainable: list[torch.nn.Parameter] | None = None
        self._validation = None
        if args.validation_prompts and qwen.edit_model:
            raise UserError("validation images for edit models need control images, which are not supported yet; "
                             "set validation_prompts: [] for an edit checkpoint.")
        if args.validation_prompts and qwen.text_encoder is not None:
            # Encoded now so the text encoder can be released before training.
            self._validation = (qwen.conditioning(list(args.validation_prompts)),
                                qwen.conditioning([" "] * len(args.validation_prompts)))
        transformer = prepare_transformer(qwen, args)
        callbacks = [SkipModuleWalks(), *(callbacks or [])]
        if self._validation is not None:
            callbacks.append(ValidationImagesCallback(self))
        super().__init__(model=transformer, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=data_collator, callbacks=callbacks, **kwargs)

    # ------------------------------------------------------------------ model calls
    def velocity(
        self,
        model: torch.nn.Module,
        noisy: torch.Tensor,
        sigma: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        height: int,
        width: int,
        attention_kwargs: dict | None = None,
        references: References | None = None,
        img_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity v = eps - x0 on packed latents at per-sample noise level ``sigma``
        (edit models: of the target tokens, with ``references`` appended as the conditioning seam does), through
        the bundle's velocity call (the model family's). ``img_mask``: the image slots of 2.1 edit embeddings."""
        if self._model_dtype is None:  # looked up once, after the backend prepared the model: ``.dtype`` walks it
            self._model_dtype = self.qwen.transformer.dtype
        dtype = self._model_dtype
        if references is not None:
            references = references.to(noisy.device, dtype)
        cond = Conditioning.from_padded(prompt_embeds.to(dtype), prompt_mask, references, img_mask)
        return self.qwen.predict_velocity(model, noisy.to(dtype), sigma, cond,
                                          self.qwen.img_shapes(noisy.shape[0], height, width),
                                          attention_kwargs=attention_kwargs)

    def _clip_grad_norm(self, model: torch.nn.Module):
        """Trainer clips ``model.parameters()``: a walk over every module and frozen weight each step (a few % of a
        small LoRA step). Unsharded, the trainable parameters are the same gradients: clip that list, kept once."""
        if self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
            return super()._clip_grad_norm(model)
        if self._trainable is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)

    # ------------------------------------------------------------------ saving / resuming
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``Trainer.train``, except that resuming from a checkpoint already at ``max_steps`` (a run killed after
        its last save) loads it and trains nothing: Trainer would run one step past max_steps."""
        if isinstance(resume_from_checkpoint, str) and self.args.max_steps > 0:
            state_file = os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)
            if os.path.isfile(state_file):
                state = TrainerState.load_from_json(state_file)
                if state.global_step >= self.args.max_steps:
                    logger.info("%s is at max_steps %d already: loaded, nothing left to train",
                                resume_from_checkpoint, self.args.max_steps)
                    self._load_from_checkpoint(resume_from_checkpoint)
                    self.state = state
                    return TrainOutput(state.global_step, 0.0, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    @property
    def is_lora(self) -> bool:
        return self.args.finetune == "lora"

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if state_dict is None:
            state_dict = model.state_dict()
        if self.is_lora:
            save_lora(model, output_dir, export_comfyui=self.args.export_comfyui, state_dict=state_dict)
        else:
            save_full(model, output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` atomically: into ``.incomplete-checkpoint-N/`` first, renamed when every file
        (weights, optimizer, scheduler, RNG states, trainer state) is written. A run killed mid-save leaves only the
        staging folder, which ``--resume_from_checkpoint last`` never picks (and the next save replaces)."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_PREFIX + name)
        final = os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staging_root):
            shutil.rmtree(staging_root)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        # Trainer writes <run_dir>/checkpoint-N and rotates old checkpoints there: point it at the staging root.
        self._get_output_dir = lambda trial=None: staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every rank's shards / RNG states are in
        if self.args.should_save:
            # Last file of the checkpoint: what it holds and which run wrote it (align/checkpoints.py); a resume
            # checks both before any weights load.
            write_manifest(os.path.join(staging_root, name), run_identity(self.args))
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root, ignore_errors=True)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging_root):
                self.state.best_model_checkpoint = final
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        rank = self.accelerator.process_index
        for name, obj in self.checkpoint_states.items():
            torch.save(obj.state_dict(), os.path.join(output_dir, CHECKPOINT_STATE_NAME.format(name=name, rank=rank)))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        for name, obj in self.checkpoint_states.items():
            path = os.path.join(checkpoint, CHECKPOINT_STATE_NAME.format(name=name, rank=self.accelerator.process_index))
            if not os.path.isfile(path):
                logger.warning("%s has no %s state (a checkpoint of an older version or another process count): "
                               "the run continues afresh there and is not an exact continuation", checkpoint, name)
                continue
            obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        ckpt = Path(resume_from_checkpoint)
        if self.is_lora and (ckpt / LORA_WEIGHT_NAME).is_file():
            from peft import set_peft_model_state_dict

            layers = {k.removeprefix("transformer."): v for k, v in load_file(ckpt / LORA_WEIGHT_NAME).items()}
            result = set_peft_model_state_dict(model, layers, adapter_name=ADAPTER_NAME)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint {ckpt} has LoRA keys this model lacks: {result.unexpected_keys[:3]}")
        elif not self.is_lora and (ckpt / "transformer").is_dir():
            state = {}
            for f in sorted((ckpt / "transformer").glob("*.safetensors")):
                state.update(load_file(f))
            model.load_state_dict(state, strict=True)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        # load_best_model_at_end: our checkpoints hold a diffusers LoRA / transformer folder the Trainer's loader
        # does not look for; DeepSpeed and FSDP checkpoints keep the Trainer's own path.
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        logger.info("loading the best checkpoint %s (%s = %s)", self.state.best_model_checkpoint,
                    self.args.metric_for_best_model, self.state.best_metric)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ------------------------------------------------------------------ validation images
    @torch.no_grad()
    def render_validation(self, seed: int = 0) -> list:
        """Images for the fixed validation prompts with the current weights (every rank runs the forward:
        sharded backends need all of them)."""
        if self._validation is None or self.qwen.vae is None:
            return []
        cond, negative = self._validation
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        size = self.args.resolution
        n = cond.embeds.shape[0]
        device = self.accelerator.device
        cond, negative = cond.to(device), negative.to(device)
        latents = self.qwen.initial_noise(n, size, size, seed=seed).to(device)
        sigmas = self.qwen.inference_sigmas(self.args.validation_num_inference_steps, size, size)
        out = sample(model, latents, sigmas, cond, self.qwen.img_shapes(n, size, size), negative=negative,
                     true_cfg_scale=self.args.validation_true_cfg_scale, velocity_fn=self.qwen.predict_velocity)
        self.qwen.vae.to(device)
        images = self.qwen.decode_latents(out.latents, size, size)
        model.train(was_training)
        return images


class SkipModuleWalks(TrainerCallback):
    """transformers' Trainer calls ``model.train()`` and ``model.zero_grad()`` at every step: Python walks over every
    submodule / parameter (330 modules on the small benchmark model, thousands on Qwen-Image), a few % of a small
    LoRA step on CPU. While training runs, ``train(mode)`` walks only when the mode differs from the one it last set
    (``eval()`` goes through it too, so validation and evaluation still switch everything), and ``zero_grad`` clears
    the parameters that were trainable at train begin (the only ones backward gives a gradient). Installed at train
    begin, removed at train end: a reference deep-copied from the policy never inherits them."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or "train" in vars(model):
            return
        walk, last = model.train, {"mode": None}
        trainable = [p for p in model.parameters() if p.requires_grad]

        def train(mode: bool = True):
            if last["mode"] is not mode:
                walk(mode)
                last["mode"] = mode
            return model

        def zero_grad(set_to_none: bool = True):
            for p in trainable:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

        model.train, model.zero_grad = train, zero_grad

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for name in ("train", "zero_grad"):
            if model is not None and name in vars(model):
                delattr(model, name)


class ValidationImagesCallback(TrainerCallback):
    """Renders the validation prompts every ``validation_steps`` and at the end; saves PNGs under
    ``<output_dir>/validation/`` and logs them to wandb when it is a report target."""

    def __init__(self, trainer: QwenImageTrainer):
        self.trainer = trainer

    def _render(self, args, state) -> None:
        images = self.trainer.render_validation()
        if not images or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            img.save(folder / f"step{state.global_step:06d}_{i}.png")
        if "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                wandb.log({"validation": [wandb.Image(img, caption=p) for img, p in zip(images, args.validation_prompts)]},
                          step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if args.validation_steps and state.global_step % args.validation_steps == 0:
            self._render(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._render(args, state)
