"""Prompts of an online run: the endless prompt stream over processes, and encoding the finite prompt sets once so
the text encoder can leave memory before training."""

from __future__ import annotations

import logging
from typing import Any

from trl.trainer.utils import RepeatSampler

from qwen_image.errors import UserError

from ..data.grpo import check_edit_prompt_sizes, reference_area
from ..data.prompts import collate_prompts
from ..modeling import release_text_encoder

logger = logging.getLogger(__name__)


def precompute_prompts_and_release(qwen, args: Any, prompts, held_out, device) -> None:
    """With ``release_text_encoder``: encode the finite prompt sets (training ``prompts``, ``held_out`` or None)
    once (edit models: each row with its control images, and the CFG negative with them), then drop the text
    encoder; otherwise move it to ``device`` (rollouts encode their prompts as they come)."""
    datasets = [ds for ds in (prompts, held_out) if ds is not None]
    qwen.text_encoder.to(device)
    check_edit_prompt_sizes(qwen, args, prompts, held_out)
    if not args.release_text_encoder:
        return
    if qwen.edit_model:
        from ..data.edit import CONTROLS
        from .rollouts import control_images

        count = 0
        for ds in datasets:
            for start in range(0, len(ds), 64):  # a chunk of rows' images in memory at a time
                rows = ds.select_columns(["prompt", CONTROLS])[start:start + 64]
                texts, images = list(rows["prompt"]), control_images(qwen, rows, len(rows["prompt"]))
                if args.true_cfg_scale > 1 and args.negative_prompt is not None:  # the negative reads the images too
                    texts, images = texts + [args.negative_prompt] * len(images), images + images
                count += qwen.precompute_conditioning(texts, images, reference_area(args))
    else:
        count = qwen.precompute_conditioning([p for ds in datasets for p in ds["prompt"]] + [args.negative_prompt])
    release_text_encoder(qwen, args)
    logger.info("encoded %d distinct prompts once; text encoder released", count)


class PromptStream:
    """Endless generation batches of prompts for this process, laid out as TRL's RepeatSampler lays them over
    processes (same seed everywhere; each rank takes its slice), so groups are whole across the gather. Its state
    is the number of indices drawn: a restored stream replays the sampler to that point."""

    def __init__(self, dataset, args: Any, process_index: int):
        self.dataset = dataset
        self.global_size = args.generation_batch_size
        self.local_size = self.global_size // args.world_size
        self.rank = process_index
        unique = self.global_size // args.num_generations
        if len(dataset) < unique:
            raise UserError(f"the prompt set has {len(dataset)} prompts; a generation batch needs {unique} distinct ones.")
        self._sampler_args = dict(mini_repeat_count=args.num_generations, batch_size=unique, repeat_count=1,
                                  shuffle=True, seed=args.seed)
        self._restart()

    def _restart(self) -> None:
        self.sampler = RepeatSampler(self.dataset, **self._sampler_args)
        self._iter = iter(self.sampler)
        self.drawn = 0

    def _take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            try:
                out.append(next(self._iter))
            except StopIteration:  # a new epoch over the prompts (RepeatSampler reshuffles)
                self._iter = iter(self.sampler)
        self.drawn += n
        return out

    def next(self) -> dict[str, list]:
        idx = self._take(self.global_size)[self.rank * self.local_size:(self.rank + 1) * self.local_size]
        return collate_prompts([self.dataset[i] for i in idx])

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restart()
        self._take(int(state["drawn"]))
