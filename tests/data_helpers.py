"""Tiny image data the tests write: blocky random images and a rated SFT imagefolder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def blocky_image(i: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """Random 8x8-pixel blocks seeded by ``i`` (width, height ``size``): structure the tiny VAE can reproduce."""
    rng = np.random.default_rng(i)
    arr = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).resize(size, Image.NEAREST)


def rated_images(folder: Path, n: int = 4) -> Path:
    """An SFT imagefolder of ``n`` random 32x32 images, each rated 5 by three raters (``folder`` must not exist)."""
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as fh:
        for i in range(n):
            Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "prompt": f"a sign {i}", "ratings": [5, 5, 5]}) + "\n")
    return folder
