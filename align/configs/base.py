"""Training configs as TRL builds them: small groups of fields (plain dataclass mixins, TRL's ``ModelConfig`` /
``ScriptArguments`` / ``<X>Config`` split) that each objective's config composes from only the groups its trainer
reads. Every config is still one flat dataclass (``trl.TrlParser`` parses one), so trainers read ``args.<field>``.

- ``ModelArguments``: model family, checkpoint, dtype, full / LoRA fine-tuning, the starting adapter;
- ``MemoryArguments``: how the frozen base is stored and placed, and the memory estimate;
- ``ImageDataArguments``: the dataset, its prompt column, the training resolution, edit models' control columns;
- ``EncodingArguments``: the cache of text embeddings and VAE latents (objectives that train on a fixed dataset);
- ``TimestepArguments``: how flow-matching sigmas are drawn; ``FlowMatchingArguments`` adds the loss weighting
  (objectives with a flow-matching loss on data; the online objectives train on their rollouts' own timesteps);
- ``ValidationArguments``: fixed prompts rendered during training;
- ``QwenImageTrainingConfig``: ``transformers.TrainingArguments`` plus the groups every objective reads (model,
  memory, data, validation) and the run-folder / export options; each objective's config adds its own groups.

Field names follow TRL where the idea is the same; parse with ``align.launch.parse_config`` so
``--config recipe.yaml`` plus CLI overrides work as in TRL scripts."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from qwen_image.errors import UserError, on_processes, stop_everywhere

# Qwen-Image's default LoRA targets (the Qwen-Image model family's; other families declare their own).
DEFAULT_LORA_TARGETS = [
    # image-stream attention
    "to_q", "to_k", "to_v", "to_out.0",
    # text-stream attention
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    # both MLPs
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
]


@dataclass
class ModelArguments:
    """Which model is trained and how: family, checkpoint, dtype, full or LoRA fine-tuning (align/modeling.py)."""

    model_family: str = field(
        default="qwen-image",
        metadata={"help": "Model family (align/models): qwen-image (Qwen-Image, 2512, Edit-2509/2511), qwen-image-2.1, "
                          "qwen-image-2.1-edit (2.1 with reference images); plugins add more."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local diffusers-format Qwen-Image folder. Empty: the tiny random model (CPU demo/tests)."}
    )
    tiny_seed: int = field(default=0, metadata={"help": "Seed of the tiny random model when no checkpoint is given."})
    tiny_variant: str = field(
        default="t2i", metadata={"help": "Tiny random model layout when no checkpoint is given: t2i, edit-2509 or edit-2511 (zero_cond_t)."}
    )
    model_dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32."})
    finetune: str = field(default="lora", metadata={"help": "lora (PEFT adapter on the transformer) or full."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r); saved in the adapter metadata."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt; default: the model family's targets (Qwen-Image: image+text "
                          "attention and both MLPs of every block)."},
    )
    lora_init: str = field(default="gaussian", metadata={"help": "PEFT init_lora_weights: gaussian (diffusers' choice) or true."})
    init_adapter: str | None = field(
        default=None, metadata={"help": "Start from this LoRA (a diffusers-format folder/file, e.g. an SFT adapter)."}
    )

    def _validate_model(self) -> None:
        if self.finetune not in ("lora", "full"):
            raise UserError(f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.finetune == "lora" and self.lora_rank < 1:
            raise UserError(f"lora_rank must be >= 1, got {self.lora_rank}")


@dataclass
class MemoryArguments:
    """How the frozen base is stored and placed (consumed by align/modeling.py; docs/low-vram.md), and the memory
    estimate. The optimizer is TrainingArguments' own ``optim``: adamw_torch (default), adamw_8bit (bitsandbytes)
    or adamw_torch_8bit (torchao) keep the LoRA's two Adam states in 8 bits."""

    base_storage: str = field(
        default="none",
        metadata={"help": "Storage of the frozen transformer blocks' Linear weights (LoRA only): none (model_dtype), "
                          "fp8 / int8 (torchao weight-only, 1 byte/param), nf4 (bitsandbytes 4-bit, ~0.56 byte/param)."},
    )
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "nf4: also quantise the block scales (double quantisation, ~0.52 byte/param; TRL's name)."}
    )
    text_encoder_storage: str = field(
        default="none",
        metadata={"help": "Storage of the text encoder while it caches prompt embeddings: none, fp8 or int8 (torchao weight-only)."},
    )
    weight_streaming: str = field(
        default="none",
        metadata={"help": "none, or blocks: keep the frozen weights of the transformer blocks in CPU memory and copy each "
                          "block to the GPU for its forward (again for its recompute in backward). Needs a single process or DDP."},
    )
    resident_blocks: int = field(
        default=0, metadata={"help": "weight_streaming=blocks: how many leading blocks stay on the GPU (more = faster, more memory)."}
    )
    estimate_only: bool = field(
        default=False, metadata={"help": "Print the estimated peak GPU memory of these options and exit before loading weights."}
    )
    estimate_text_tokens: int = field(
        default=256, metadata={"help": "Prompt length (tokens) the memory estimate assumes."}
    )


@dataclass
class ImageDataArguments:
    """The training data every objective reads (images, pairs, rated images or prompts), at one resolution; edit
    models' rows carry their control (reference) images (docs/edit.md)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "An imagefolder with metadata.jsonl, a dataset saved with save_to_disk, or a local datasets script/folder."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    prompt_column: str = field(default="prompt", metadata={"help": "Caption column."})
    resolution: int = field(default=1024, metadata={"help": "Training resolution in px (multiple of 16); tiny recipes use 64."})
    # --- edit models (read when the checkpoint is an Edit-2509/2511 one)
    control_columns: list[str] = field(
        default_factory=lambda: ["control_image", "control_image_1", "control_image_2"],
        metadata={"help": "Edit: numbered control (reference) image columns, in order."},
    )
    control_images_column: str = field(default="control_images", metadata={"help": "Edit: a list column of 1-3 control images (instead of numbered columns)."})
    control_resolution: int = field(default=0, metadata={"help": "Edit: control images at about this side squared in px on the VAE side (0: the model's reference area, as at inference)."})
    num_control_images: int = field(default=0, metadata={"help": "Edit: require exactly this many control images per row (0: any of 1-3)."})

    def _validate_data(self) -> None:
        if self.resolution <= 0 or self.resolution % 16:
            raise UserError(f"resolution must be a positive multiple of 16 px, got {self.resolution}")


@dataclass
class EncodingArguments:
    """The cache of text embeddings and VAE latents of a fixed dataset (SFT, DPO, KTO: encoded once before
    training; online objectives encode their prompts as they go)."""

    cache_dir: str | None = field(
        default=None, metadata={"help": "Where cached text embeddings / VAE latents go (default: <output_dir>/cache)."}
    )
    encode_batch_size: int = field(default=4, metadata={"help": "Batch size when caching embeddings and latents."})

    @property
    def encoding_cache_dir(self) -> str:
        return self.cache_dir or os.path.join(self.output_dir or ".", "cache")  # type: ignore[attr-defined]


@dataclass
class TimestepArguments:
    """How the sigmas of a flow-matching loss on data are drawn (align/losses/flow_matching.py)."""

    timestep_sampling: str = field(
        default="qwen_shift", metadata={"help": "uniform | logit_normal | mode | qwen_shift (Qwen-Image's resolution-dependent shift)."}
    )
    logit_mean: float = field(default=0.0, metadata={"help": "logit_normal: mean of the logit."})
    logit_std: float = field(default=1.0, metadata={"help": "logit_normal: standard deviation of the logit."})
    mode_scale: float = field(default=1.29, metadata={"help": "mode: the scale of the mode-sampling density."})


@dataclass
class FlowMatchingArguments(TimestepArguments):
    """Timestep sampling plus the weighting of the flow-matching loss (SFT, and DPO's flow-matching term w_sft)."""

    loss_weighting: str = field(default="none", metadata={"help": "none | sigma_sqrt | cosmap."})


@dataclass
class ValidationArguments:
    """Fixed prompts rendered with the current weights every ``validation_steps`` and at the end (every trainer)."""

    validation_prompts: list[str] = field(default_factory=list, metadata={"help": "Fixed prompts rendered every validation_steps."})
    validation_steps: int = field(default=0, metadata={"help": "Log validation images every N steps (0: only at the end)."})
    validation_num_inference_steps: int = field(default=20, metadata={"help": "Sampler steps for validation images."})
    validation_true_cfg_scale: float = field(default=4.0, metadata={"help": "True CFG scale for validation images."})


@dataclass
class QwenImageTrainingConfig(ValidationArguments, ImageDataArguments, MemoryArguments, ModelArguments,
                              TrainingArguments):
    """``transformers.TrainingArguments`` plus the groups every objective reads; an objective's config adds its
    own groups and fields (``SFTConfig``, ``DPOConfig``, ``GRPOConfig``, ...)."""

    export_comfyui: bool = field(default=False, metadata={"help": "Also write the adapter with ComfyUI keys (diffusion_model.*)."})
    # --- run folder (transformers 5 dropped this TrainingArguments field; its meaning is kept)
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a previous run in output_dir (its checkpoint-* folders are removed). Without it such an output_dir is refused unless resuming."},
    )

    def __post_init__(self):
        # Batches are dicts of cached tensors, not model kwargs.
        self.remove_unused_columns = False
        # diffusers models enable checkpointing themselves (Trainer would call a transformers-only method). Either
        # name turns it on (recipes say gradient_checkpointing, transformers 5's new name is activation_checkpointing);
        # the Trainer sees it off under the new name, so it does not warn about the old one.
        self.transformer_gradient_checkpointing = bool(self.gradient_checkpointing or self.activation_checkpointing)
        self.gradient_checkpointing = None
        self.activation_checkpointing = False
        super().__post_init__()
        self._validate_model_fields()

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work"):
        """transformers' context (the main process runs the block first, e.g. encodes the data into the cache; the
        others wait, then run it reading that cache), except that a mistake the main process finds in the block (a
        row, a prompt too long) stops every process at the same point with one line, printed once: the others
        would otherwise start the same work over only to meet the same mistake. The processes exchange the main
        process's outcome (``all_gather_object``) where transformers has them meet at a barrier."""
        import torch.distributed as dist

        state = self.distributed_state
        if self.world_size <= 1 or state is None or not (dist.is_available() and dist.is_initialized()):
            with super().main_process_first(local=local, desc=desc):
                yield
            return
        is_main = state.is_local_main_process if local else state.is_main_process
        if not is_main:
            _stop_if_failed(_outcomes(is_main, None))
            yield
            return
        try:
            yield
        except UserError as err:
            _stop_if_failed(_outcomes(is_main, str(err)), err)
            raise
        except BaseException:
            _outcomes(is_main, None)  # a bug: release the others as transformers' barrier does (they meet it too)
            raise
        _stop_if_failed(_outcomes(is_main, None))

    def _validate_model_fields(self) -> None:
        self._validate_model()
        self._validate_data()
        from ..lowvram import validate_memory_options

        validate_memory_options(self)


def _outcomes(is_main: bool, error: str | None) -> list[dict]:
    """Every process's ``{"main": is_main, "error": error}``, in rank order."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"main": is_main, "error": error})
    return gathered


def _stop_if_failed(outcomes: list[dict], cause: BaseException | None = None) -> None:
    """Raise the first main process's mistake on every process (printed once, by process 0), naming the main
    processes that met it when not all of them did (nodes without a shared file system each encode their own)."""
    failed = [(rank, o["error"]) for rank, o in enumerate(outcomes) if o["error"] is not None]
    if not failed:
        return
    mains = sum(1 for o in outcomes if o["main"])
    rank, message = failed[0]
    where = on_processes(rank, len(failed), len(outcomes)) if len(failed) < mains else ""
    raise stop_everywhere(message + where) from cause
