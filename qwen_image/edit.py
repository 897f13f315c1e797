"""Edit-model conditioning (Qwen-Image-Edit-2509 / 2511), as ``QwenImageEditPlusPipeline`` builds it.

Each reference (control) image reaches the transformer twice:

* through Qwen2.5-VL, as "Picture i: <|vision_start|><|image_pad|><|vision_end|>" in front of the instruction in
  the edit template, at the *condition* size (about 384² px on the real model; the first 64 template tokens are
  dropped, so the vision tokens stay in the embeddings);
* through the VAE at the *reference* size (about 1024² px), packed into tokens that follow the noisy target tokens
  (:class:`qwen_image.sampling.References`).

Both sizes keep the image's aspect ratio and round each side to 32 px (diffusers' ``calculate_dimensions``).
Text embeddings now depend on the images, so their cache key holds the images' pixels too.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Sequence

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
    calculate_dimensions,
)
from PIL import Image

from . import latents as latent_ops
from .errors import QwenImageInputError
from .sampling import Conditioning, References
from .text import EDIT_DROP_TOKENS, EDIT_TEMPLATE, MAX_PROMPT_TOKENS, pad_embeddings, validate_prompts

MAX_REFERENCES = 3  # Edit-2509/2511 are trained and documented for 1-3 input images
PICTURE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
# The real model's sizes relative to its 1024 px default: condition area (384/1024)², reference area 1.
CONDITION_SIDE_FRACTION = (CONDITION_IMAGE_SIZE / VAE_IMAGE_SIZE) ** 0.5


def edit_size(image: Image.Image, area: int) -> tuple[int, int]:
    """(height, width) of about ``area`` px with the image's aspect ratio, sides multiples of 32 (as EditPlus)."""
    width, height = calculate_dimensions(area, image.width / image.height)
    if width <= 0 or height <= 0:
        raise QwenImageInputError(
            f"a {image.width}x{image.height} reference is too elongated for a {int(area ** 0.5)}² px area "
            "(a side rounds to 0 px); crop it closer to square.")
    return int(height), int(width)


def edit_prompt(instruction: str, n_images: int) -> str:
    """The instruction with one "Picture i:" vision block per reference, inside the edit template."""
    return EDIT_TEMPLATE.format("".join(PICTURE_TEMPLATE.format(i + 1) for i in range(n_images)) + instruction)


def normalize_references(images, n_rows: int) -> list[list[Image.Image]]:
    """``images``: one PIL image, a list of 1-3 images shared by every row, or one such list per row.
    Returns one list per row, each image RGB; every row must have the same number of references."""
    if isinstance(images, (list, tuple)) and len(images) == 0:
        raise QwenImageInputError(f"edit takes 1 to {MAX_REFERENCES} reference images, got 0.")
    if isinstance(images, Image.Image):
        rows = [[images]] * n_rows
    elif isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        rows = [list(images)] * n_rows
    elif isinstance(images, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in images):
        rows = [list(r) for r in images]
        if len(rows) != n_rows:
            raise QwenImageInputError(f"got reference images for {len(rows)} rows but {n_rows} prompts.")
    else:
        raise QwenImageInputError("reference images must be a PIL image, a list of 1-3 PIL images, or one such "
                                  "list per prompt.")
    for i, row in enumerate(rows):
        if not 1 <= len(row) <= MAX_REFERENCES:
            raise QwenImageInputError(f"edit takes 1 to {MAX_REFERENCES} reference images, row {i} has {len(row)}.")
        bad = [type(x).__name__ for x in row if not isinstance(x, Image.Image)]
        if bad:
            raise QwenImageInputError(f"row {i}: reference images must be PIL images, got {bad[0]}.")
    if len({len(r) for r in rows}) > 1:
        raise QwenImageInputError("every row of a batch needs the same number of reference images.")
    return [[im.convert("RGB") for im in row] for row in rows]


def image_digest(image: Image.Image) -> str:
    return hashlib.sha1(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


class EditEncoder:
    """Encodes edit instructions with their reference images (text side) and the references themselves (VAE side)
    exactly like ``QwenImageEditPlusPipeline``; per-row LRU cache of text embeddings keyed by instruction, the
    images' pixels and the condition area.

    Reads the model's text encoder, processor and VAE at call time, so releasing them on the model is seen here.
    """

    def __init__(self, model: Any, cache_size: int = 256):
        self.model = model
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        # EditPlus's own image processor: lanczos resize, [-1, 1] tensors, sides multiples of 16.
        self.image_processor = VaeImageProcessor(vae_scale_factor=latent_ops.SIZE_MULTIPLE)

    def clear_cache(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------------ sizes
    def condition_size(self, image: Image.Image) -> tuple[int, int]:
        return edit_size(image, self.model.edit_condition_area)

    def reference_size(self, image: Image.Image, area: int | None = None) -> tuple[int, int]:
        """VAE-side size; ``area`` overrides the model's reference area (training at a smaller control size)."""
        return edit_size(image, area or self.model.edit_reference_area)

    def default_target_size(self, references: Sequence[Image.Image]) -> tuple[int, int]:
        """EditPlus's default output size: the last reference's aspect ratio at the model's default area."""
        height, width = edit_size(references[-1], self.model.default_size ** 2)
        return height // latent_ops.SIZE_MULTIPLE * latent_ops.SIZE_MULTIPLE, width // latent_ops.SIZE_MULTIPLE * latent_ops.SIZE_MULTIPLE

    # ------------------------------------------------------------------ text side
    def _key(self, prompt: str, images: Sequence[Image.Image]) -> tuple:
        return (prompt, self.model.edit_condition_area, *(image_digest(im) for im in images))

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str], rows: list[list[Image.Image]]) -> list[torch.Tensor]:
        model = self.model
        if model.text_encoder is None:
            raise QwenImageInputError(
                f"edit prompt {prompts[0][:60]!r} with its images was not encoded before the text encoder was "
                "released; encode every row first or keep the text encoder loaded.")
        if model.processor is None:
            raise QwenImageInputError("this QwenImage has no processor/ (Qwen2-VL): it cannot encode edit prompts.")
        for i, p in enumerate(prompts):
            n = len(model.tokenizer(p).input_ids)
            if n > MAX_PROMPT_TOKENS:
                raise QwenImageInputError(
                    f"instruction #{i} is {n} tokens; Qwen-Image reads at most {MAX_PROMPT_TOKENS}. Shorten it.")
        condition_images = [self.image_processor.resize(im, *self.condition_size(im)) for row in rows for im in row]
        texts = [edit_prompt(p, len(row)) for p, row in zip(prompts, rows)]
        device = model.text_encoder.device
        inputs = model.processor(text=texts, images=condition_images, padding=True, return_tensors="pt").to(device)
        out = model.text_encoder(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]
        mask = inputs["attention_mask"].bool()
        return [h[m][EDIT_DROP_TOKENS:] for h, m in zip(hidden, mask)]

    def encode_prompts(
        self, prompts: str | list[str], images, device=None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, L, D) embeddings and 0/1 mask (B, L) of each instruction with its references."""
        prompts = validate_prompts(prompts)
        rows = normalize_references(images, len(prompts))
        keys = [self._key(p, r) for p, r in zip(prompts, rows)]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            idx = [first[k] for k in todo]
            for k, emb in zip(todo, self._encode_uncached([prompts[i] for i in idx], [rows[i] for i in idx])):
                self._cache[k] = emb.detach()
        for k in keys:
            self._cache.move_to_end(k)
        per_row = [self._cache[k] for k in keys]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return pad_embeddings(per_row, device=device, dtype=dtype)

    # ------------------------------------------------------------------ VAE side
    def reference_pixels(self, image: Image.Image, area: int | None = None) -> torch.Tensor:
        """(1, 3, 1, H, W) in [-1, 1] at the reference size (EditPlus's preprocessing)."""
        return self.image_processor.preprocess(image.convert("RGB"), *self.reference_size(image, area)).unsqueeze(2)

    @torch.no_grad()
    def encode_reference_latents(self, images: Sequence[Image.Image], area: int | None = None) -> list[torch.Tensor]:
        """Packed latents (L_i, 64) of each image at its reference size (one VAE call per image)."""
        model = self.model
        model._require("vae")
        return [latent_ops.pack(latent_ops.encode(model.vae, self.reference_pixels(im, area)))[0] for im in images]

    def references(self, images, n_rows: int, device=None, dtype: torch.dtype | None = None,
                   area: int | None = None) -> References:
        """The VAE side of a batch: every row's references, which must have the same sizes across rows (``area``:
        as in :meth:`reference_size`)."""
        rows = normalize_references(images, n_rows)
        sizes = [[self.reference_size(im, area) for im in row] for row in rows]
        if any(s != sizes[0] for s in sizes):
            raise QwenImageInputError(
                f"reference sizes differ between rows ({sizes[0]} vs {next(s for s in sizes if s != sizes[0])}); "
                "batch rows whose references share aspect ratios, or edit one row at a time.")
        cache: dict[str, torch.Tensor] = {}
        per_row = []
        for row in rows:
            lat = []
            for im in row:
                key = image_digest(im)
                if key not in cache:
                    cache[key] = self.encode_reference_latents([im], area)[0]
                lat.append(cache[key])
            per_row.append(torch.cat(lat, dim=0))
        shapes = [(1, h // latent_ops.SIZE_MULTIPLE, w // latent_ops.SIZE_MULTIPLE) for h, w in sizes[0]]
        return References(torch.stack(per_row).to(device=device, dtype=dtype), shapes)

    def conditioning(self, prompts: str | list[str], images, device=None, dtype: torch.dtype | None = None,
                     area: int | None = None) -> Conditioning:
        prompts = validate_prompts(prompts)
        embeds, mask = self.encode_prompts(prompts, images, device=device, dtype=dtype)
        return Conditioning.from_padded(embeds, mask, self.references(images, len(prompts), device, dtype, area))

    def precompute(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]], progress: bool = False) -> int:
        """Encode every (instruction, its images) row once and keep the embeddings on CPU, so the text encoder can
        be released while training still samples these rows (GRPO's finite prompt set). Returns the distinct rows."""
        from tqdm.auto import tqdm

        prompts = validate_prompts(list(prompts))
        rows = normalize_references([list(r) for r in images], len(prompts))
        todo = {}
        for p, row in zip(prompts, rows):
            todo.setdefault(self._key(p, row), (p, row))
        self.cache_size = max(self.cache_size, len(self._cache) + len(todo) + 256)  # nothing precomputed is evicted
        for key, (p, row) in tqdm(todo.items(), disable=not progress, desc="Encoding edit prompts", leave=False):
            if key not in self._cache:
                self._cache[key] = self._encode_uncached([p], [row])[0].detach().cpu()
        return len(todo)
