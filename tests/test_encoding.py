"""The latent/embedding cache: stored flat as float32 Arrow lists, read back (after a reload from disk) into exactly
the tensors the VAE and the text encoder give, with each row's own shape (buckets, prompt lengths)."""

import numpy as np
import torch
from datasets import Dataset
from PIL import Image

from align.data.buckets import BucketSizeFn
from align.data.encoding import TENSOR_FEATURE, center_crop_resize, collate_encoded, encode_dataset
from qwen_image import pack


def test_cache_round_trip_gives_the_encoders_tensors(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(64, 32), (32, 64), (48, 40)]  # (width, height): wide, tall, near-square buckets
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in sizes]
    prompts = ["a", "a much longer prompt about a red sign", "short one"]
    raw = Dataset.from_dict({"image": images, "prompt": prompts, "unit": [0, 1, 2]})
    size_fn = BucketSizeFn(48)
    kwargs = dict(image_columns=["image"], resolution=48, size_fn=size_fn, batch_size=2)
    encode_dataset(raw, tiny_model, "tiny", str(tmp_path), **kwargs)
    cached = encode_dataset(raw, tiny_model, "tiny", str(tmp_path), **kwargs)  # second call: read from the cache file
    assert cached.cache_files and cached.features["image_latents"] == TENSOR_FEATURE
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        h, w = size_fn(img)
        batch = collate_encoded([cached[i]])
        assert (batch["height"], batch["width"]) == (h, w) and batch["unit"] == [i]
        with torch.no_grad():
            want_latents = pack(tiny_model.encode_images([center_crop_resize(img, h, w)], h, w)).float()
            embeds, mask = tiny_model.encode_prompt([prompt])
        torch.testing.assert_close(batch["image_latents"], want_latents, rtol=0, atol=1e-6)
        n = int(mask[0].sum())
        assert batch["prompt_embeds"].shape == (1, n, embeds.shape[-1])
        torch.testing.assert_close(batch["prompt_embeds"][0], embeds[0, :n].float(), rtol=0, atol=1e-6)
    # Rows of one size batch together; prompts of different lengths are padded and masked.
    pair = collate_encoded([cached[1], cached[1]])
    assert pair["image_latents"].shape[0] == 2 and pair["prompt_mask"].all()
