"""Cache text embeddings and VAE latents once with ``datasets.map`` (fingerprinted, on disk), so the text encoder
and the VAE can leave the GPU before the transformer trains: what makes 20B training fit."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Sequence

import torch
from datasets import Dataset
from PIL import Image

from qwen_image import QwenImage, pack

from ..images import to_rgb

ENCODING_VERSION = "3"  # 3: images go through align.images.to_rgb (16-bit, alpha, EXIF)
SizeFn = Callable[[Image.Image], tuple[int, int]]


def center_crop_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize the short side then center-crop to exactly height x width (keeps aspect, no distortion)."""
    image = to_rgb(image)
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def encoding_fingerprint(dataset: Dataset, model_id: str, **settings) -> str:
    payload = json.dumps({"data": dataset._fingerprint, "model": model_id, "v": ENCODING_VERSION, **settings},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def encode_dataset(
    dataset: Dataset,
    model: QwenImage,
    model_id: str,
    cache_dir: str,
    image_columns: Sequence[str] = ("image",),
    prompt_column: str = "prompt",
    resolution: int = 1024,
    size_fn: SizeFn | None = None,
    flip_column: str | None = None,
    batch_size: int = 4,
) -> Dataset:
    """Add ``prompt_embeds`` (L_i, D) and, per image column C, ``C_latents`` (packed tokens, (h/16*w/16, 64)) plus
    ``height``/``width``. ``size_fn(image) -> (h, w)`` picks each row's size (aspect-ratio buckets); default square.
    Rows with a true ``flip_column`` are mirrored before encoding. Re-running with the same data, model and settings
    loads the cache instead of encoding again."""
    fingerprint = encoding_fingerprint(
        dataset, model_id, images=list(image_columns), prompt=prompt_column, res=resolution,
        size=getattr(size_fn, "__qualname__", None), size_repr=repr(size_fn), flip=flip_column,
    )
    os.makedirs(cache_dir, exist_ok=True)

    @torch.no_grad()
    def encode_batch(batch: dict) -> dict:
        out: dict = {}
        embeds, mask = model.encode_prompt(list(batch[prompt_column]))
        lengths = mask.sum(1).tolist()
        out["prompt_embeds"] = [e[:n].float().cpu().numpy() for e, n in zip(embeds, lengths)]
        # RGB (and EXIF-upright) first: bucket sizes must see the image as it will be trained.
        images = {column: [to_rgb(img) for img in batch[column]] for column in image_columns}
        first = images[image_columns[0]]
        sizes = [size_fn(img) if size_fn else (resolution, resolution) for img in first]
        out["height"] = [h for h, _ in sizes]
        out["width"] = [w for _, w in sizes]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            by_size.setdefault(size, []).append(i)
        for column in image_columns:
            prepared = []
            for i, img in enumerate(images[column]):
                img = center_crop_resize(img, *sizes[i])
                if flip_column and batch[flip_column][i]:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                prepared.append(img)
            latents: list = [None] * len(prepared)
            # One VAE call per image size in the batch (~4x faster than one call per image on CPU).
            for (h, w), rows in by_size.items():
                packed = pack(model.encode_images([prepared[i] for i in rows], h, w)).float().cpu().numpy()
                for i, lat in zip(rows, packed):
                    latents[i] = lat
            out[f"{column}_latents"] = latents
        return out

    encoded = dataset.map(
        encode_batch,
        batched=True,
        batch_size=batch_size,
        remove_columns=list(image_columns),
        new_fingerprint=fingerprint,
        cache_file_name=os.path.join(cache_dir, f"encoded-{fingerprint}.arrow"),
        desc="Caching text embeddings and VAE latents",
    )
    return encoded.with_format("torch", columns=["prompt_embeds", "height", "width",
                                                 *[f"{c}_latents" for c in image_columns]], output_all_columns=True)


def pad_prompt_embeds(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from qwen_image.text import pad_embeddings

    return pad_embeddings([torch.as_tensor(e) for e in embeds])


def collate_encoded(rows: list[dict], latent_columns: Sequence[str] = ("image_latents",)) -> dict:
    """Stack cached rows: ``prompt_embeds`` (B, L, D) + ``prompt_mask`` (B, L), each latent column (B, N, 64),
    ``height``/``width`` (same for the whole batch: buckets guarantee it)."""
    embeds, mask = pad_prompt_embeds([r["prompt_embeds"] for r in rows])
    heights = {int(r["height"]) for r in rows}
    widths = {int(r["width"]) for r in rows}
    if len(heights) > 1 or len(widths) > 1:
        raise ValueError("a batch mixes image sizes; use the bucket sampler (align.data.buckets) or one resolution.")
    batch = {"prompt_embeds": embeds, "prompt_mask": mask, "height": heights.pop(), "width": widths.pop()}
    for column in latent_columns:
        batch[column] = torch.stack([torch.as_tensor(r[column]) for r in rows])
    for key in rows[0]:
        if key not in batch and key != "prompt_embeds":
            batch[key] = [r[key] for r in rows]
    return batch
