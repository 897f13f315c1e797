"""GRPO prompt sets, plain and combined trainer alike: the training prompts (``train_prompts`` / a file in it, or a
dataset) and the held-out monitor prompts, read and checked before the model loads (:mod:`align.data.prompts`;
edit models: each row with its control images), and the check that an edit prompt set's control sizes fit the
rollout batches. The objective (``align.rl``: prompt stream, rollouts) streams and rolls them out."""

from __future__ import annotations

import io

from PIL import Image

from qwen_image.errors import UserError

from ..configs.grpo import GRPOArguments
from ..modeling import uses_edit_model
from .edit import CONTROLS, check_no_control_columns
from .prompts import EditPromptColumns, load_prompt_dataset


def reference_area(args: GRPOArguments) -> int | None:
    """Edit rollouts: the control images' VAE-side area (``control_resolution``²; None = the model's, as at
    inference)."""
    side = getattr(args, "control_resolution", 0)
    return side * side if side else None


def check_edit_prompt_sizes(qwen, args: GRPOArguments, prompts, held_out=None) -> None:
    """A rollout micro-batch shares one reference grid (tokens of different lengths cannot be batched). Training
    micro-batches hold consecutive copies of a prompt (the prompt stream's layout), so mixed control sizes are fine
    when every micro-batch lies inside one group (``num_generations`` a multiple of the rollout batch size); the
    held-out monitor batches several rows, so its rows must agree unless it renders one at a time. Checked once,
    before any rollout, from the image headers."""
    if not qwen.edit_model:
        return
    bs = args.rollout_batch_size
    checks = [(prompts, "edit prompts", args.num_generations % bs == 0,
               f"make num_generations ({args.num_generations}) a multiple of the rollout batch size")]
    if held_out is not None:
        checks.append((held_out, "held-out edit prompts", bs == 1, "set grpo_batch_size: 1"))
    for ds, what, grouped, fix in checks:
        if grouped:
            continue
        grids = _reference_grids(qwen, args, ds)
        if len(grids) > 1:
            (a, pa), (b, pb) = list(grids.items())[:2]
            raise UserError(f"{what} with different control sizes ({list(a)} for {pa[:40]!r}, {list(b)} for "
                            f"{pb[:40]!r}) cannot share a rollout batch of {bs} (grpo_batch_size / "
                            f"per_device_train_batch_size): {fix}, or use control images of one aspect ratio")


def _reference_grids(qwen, args: GRPOArguments, ds) -> dict[tuple, str]:
    """Each distinct tuple of reference sizes in ``ds`` -> the first prompt that has it."""
    area = reference_area(args)
    grids: dict[tuple, str] = {}
    for row in ds.select_columns(["prompt", CONTROLS]):
        sizes = []
        for cell in row[CONTROLS]:
            with Image.open(cell["path"] if cell["bytes"] is None else io.BytesIO(cell["bytes"])) as im:
                sizes.append(qwen.reference_size(im, area))  # reads the header, not the pixels
        grids.setdefault(tuple(sizes), row["prompt"])
    return grids


def edit_prompt_columns(args: GRPOArguments):
    """For an edit model (checkpoint or tiny variant, decided before the weights load): where its prompt rows keep
    their control images; None for text-to-image."""
    if not uses_edit_model(args):  # type: ignore[arg-type]
        return None
    return EditPromptColumns(args.control_columns, args.control_images_column, args.num_control_images)  # type: ignore[attr-defined]


def load_grpo_prompts(args: GRPOArguments):
    """The prompts GRPO rolls out: ``train_prompts`` / a file in it, or ``dataset_name`` (``grpo_dataset_name`` in the
    combined trainer, whose ``dataset_name`` holds the pairs). Edit models: each row with its control images."""
    combined = hasattr(args, "grpo_dataset_name")
    name = args.grpo_dataset_name if combined else args.dataset_name  # type: ignore[attr-defined]
    split = "train" if combined else args.dataset_split  # type: ignore[attr-defined]
    edit = edit_prompt_columns(args)
    prompts = load_prompt_dataset(name, args.train_prompts, split, args.prompt_column,  # type: ignore[attr-defined]
                                  edit=edit)
    if edit is None:  # a text-to-image model would roll out the edit prompts without their images
        option = ("--grpo_dataset_name" if combined else "--dataset_name") if name else "--train_prompts"
        check_no_control_columns(prompts.column_names, name or " ".join(args.train_prompts or []), option)
    unique = args.generation_batch_size // args.num_generations
    if len(prompts) < unique:  # checked here, before any weights load
        raise UserError(f"the prompt set has {len(prompts)} prompts; a generation batch needs {unique} distinct ones "
                        f"(generation batch {args.generation_batch_size} / num_generations {args.num_generations}): "
                        f"add prompts or lower the batch")
    return prompts


def load_monitor_prompts(args: GRPOArguments):
    """The held-out prompt set, or None when no monitor is configured."""
    if not args.has_monitor:
        return None
    return load_prompt_dataset(args.monitor_dataset_name, args.monitor_prompts, "train", args.prompt_column,  # type: ignore[attr-defined]
                               edit=edit_prompt_columns(args))
