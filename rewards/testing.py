"""Tiny random models for tests (offline, seconds): a CLIP checkpoint with its processor, and an aesthetic head.

    from rewards.testing import make_tiny_clip, make_tiny_aesthetic_head
    path = make_tiny_clip(tmp_path / "clip")         # loads with get_reward("clip_score", model_path=path)
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["tiny_clip_tokenizer", "make_tiny_clip", "make_tiny_aesthetic_head"]


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
