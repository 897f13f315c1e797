"""Tiny random models for tests (offline, seconds): a CLIP checkpoint with its processor, and an aesthetic head.

    from rewards.testing import make_tiny_clip, make_tiny_aesthetic_head
    path = make_tiny_clip(tmp_path / "clip")         # loads with get_reward("clip_score", model_path=path)
    folder = write_synthetic_pairs(tmp_path / "pairs")  # pairs judged by simulated raters who like red
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

__all__ = ["tiny_clip_tokenizer", "make_tiny_clip", "make_tiny_aesthetic_head", "redness", "synthetic_image",
           "simulated_votes", "write_synthetic_pairs"]


def tiny_clip_tokenizer():
    """A byte-level CLIPTokenizer built in memory (no merges: one token per byte), vocab size 514."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    syms = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(syms)}
    for s in syms:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)  # 512
    vocab["<|endoftext|>"] = len(vocab)  # 513
    return CLIPTokenizer(vocab=vocab, merges=[])


def make_tiny_clip(path, *, seed: int = 0, projection_dim: int = 16, image_size: int = 32) -> Path:
    """Save a seeded random ~61k-parameter CLIPModel + CLIPProcessor to ``path`` (HF layout); returns it."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    try:
        from transformers import CLIPImageProcessorPil as _ImgProc  # no torchvision needed, no warning
    except ImportError:  # pragma: no cover
        from transformers import CLIPImageProcessor as _ImgProc

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=projection_dim,
    )
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    model.save_pretrained(str(path))
    proc = CLIPProcessor(image_processor=_ImgProc(size={"shortest_edge": image_size},
                                                  crop_size={"height": image_size, "width": image_size}),
                         tokenizer=tok)
    proc.save_pretrained(str(path))
    return path


def make_tiny_aesthetic_head(path, in_dim: int = 16, hidden: tuple[int, ...] = (8, 4), *, seed: int = 0) -> Path:
    """Save a random LAION-style MLP head (``layers.0``, ``layers.2``... Linear, Dropouts between) to ``path``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = [in_dim, *hidden, 1]
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        sd[f"layers.{2 * i}.weight"] = torch.randn(b, a, generator=gen) / a ** 0.5
        sd[f"layers.{2 * i}.bias"] = torch.randn(b, generator=gen) * 0.1
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


def redness(image) -> float:
    """The simulated raters' ground truth: mean red minus mean blue, in [-1, 1]."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return float(a[..., 0].mean() - a[..., 2].mean())


def synthetic_image(rng: random.Random, size: int = 32):
    """A random colour with pixel noise (the tiny CLIP sees it at 32 px)."""
    import numpy as np
    from PIL import Image

    colour = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float64)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, 12.0, (size, size, 3))
    return Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8))


def simulated_votes(u_a: float, u_b: float, rng: random.Random, noise: Sequence[float] = (0.05, 0.05, 0.05),
                    both_bad_below: float | None = None) -> list[str]:
    """One vote per simulated rater: "left" when a looks better to them (its utility plus Gaussian noise of the
    rater's own size), else "right"; "both_bad" when both look below ``both_bad_below``."""
    votes = []
    for sd in noise:
        a, b = u_a + rng.gauss(0, sd), u_b + rng.gauss(0, sd)
        if both_bad_below is not None and max(a, b) < both_bad_below:
            votes.append("both_bad")
        else:
            votes.append("left" if a > b else "right")
    return votes


def write_synthetic_pairs(out, *, prompts: int = 12, images_per_prompt: int = 4, noise=(0.05, 0.05, 0.05),
                          both_bad_below: float | None = None, min_gap: float = 0.0, seed: int = 0) -> Path:
    """A pairs folder shaped like a pull's: ``images/``, ``metadata.jsonl`` (prompt, chosen, rejected, votes,
    n_votes, agreement, pair_id, raters, rater_choices) for every pair of candidates per prompt, judged by
    simulated raters who prefer redder images (:func:`redness`); the candidates of one prompt differ in redness by
    at least ``min_gap``. A split vote without a majority is written with
    ``outcome: "tie"``, a "both bad" majority with ``outcome: "both_bad"`` (a pull drops both; a reward model can
    use the ties)."""
    import itertools
    from collections import Counter

    rng = random.Random(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(prompts):
        prompt = f"a poster, colour study {p}"
        names = []
        while len(names) < images_per_prompt:
            img = synthetic_image(rng)
            u = redness(img)
            if any(abs(u - v) < min_gap for _, v in names):  # keep every pair of this prompt clearly ordered
                continue
            name = f"images/p{p:03d}_{len(names)}.png"
            img.save(out / name)
            names.append((name, u))
        for (na, ua), (nb, ub) in itertools.combinations(names, 2):
            votes = simulated_votes(ua, ub, rng, noise, both_bad_below)
            counts = Counter(votes)
            top, n_top = counts.most_common(1)[0]
            row = {"prompt": prompt, "pair_id": f"p{p}_{na[-5]}_{nb[-5]}", "n_votes": len(votes),
                   "raters": [f"r{i}" for i in range(len(votes))]}
            if 2 * n_top <= len(votes) or top == "both_bad":
                outcome = "tie" if 2 * n_top <= len(votes) else "both_bad"
                as_side = {"left": "chosen", "right": "rejected", "both_bad": "both_bad"}
                rows.append({**row, "chosen": na, "rejected": nb, "outcome": outcome, "votes": n_top,
                             "agreement": n_top / len(votes), "rater_choices": [as_side[v] for v in votes]})
                continue
            chosen, rejected = (na, nb) if top == "left" else (nb, na)
            as_side = {top: "chosen", "both_bad": "both_bad", ("right" if top == "left" else "left"): "rejected"}
            rows.append({**row, "chosen": chosen, "rejected": rejected, "votes": n_top,
                         "agreement": n_top / len(votes), "rater_choices": [as_side[v] for v in votes]})
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return out
