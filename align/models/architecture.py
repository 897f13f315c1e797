"""Architecture numbers of a transformer, read from a meta-device model (no weights): what the memory estimator
(``align/memory.py``) needs from a model family."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs from the transformer config."""

    num_blocks: int
    inner_dim: int
    block_linears: tuple[LinearShape, ...]
    block_other_params: int  # norms inside a block
    non_block_params: int
    grad_weight_params: int  # Linear weights whose input needs grad (their backward uses the weight)
    # Per family (None: the estimator's Qwen-Image numbers): tensors of width inner_dim one block saves for backward
    # per token (measured on a real-size block), and the text encoder's / VAE's parameters (the caching phase).
    act_widths_per_token: float | None = None
    text_encoder_params: float | None = None
    vae_params: float | None = None

    @property
    def block_params(self) -> int:
        return sum(lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0) for lin in self.block_linears) + self.block_other_params


@lru_cache(maxsize=16)
def measure_architecture(class_path: str, config_json: str | None = None, blocks_attr: str = "transformer_blocks",
                         no_grad_suffixes: tuple[str, ...] = ()) -> Architecture:
    """Build ``class_path`` (``module:Class``) on the meta device with ``config_json`` (None: its defaults) and
    read its blocks. Linears whose name ends with one of ``no_grad_suffixes`` act on inputs that need no grad
    (e.g. modulation on the timestep embedding): backward does not keep their weights."""
    import importlib

    import torch

    module, _, name = class_path.partition(":")
    model_class = getattr(importlib.import_module(module), name)
    kwargs = json.loads(config_json) if config_json else {}
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = model_class(**kwargs)
    blocks = getattr(model, blocks_attr)
    block = blocks[0]
    linears, linear_params = [], set()
    for lname, mod in block.named_modules():
        if isinstance(mod, torch.nn.Linear):
            linears.append(LinearShape(lname, mod.in_features, mod.out_features, mod.bias is not None))
            linear_params |= {id(p) for p in mod.parameters()}
    other = sum(p.numel() for p in block.parameters() if id(p) not in linear_params)
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    total = sum(p.numel() for p in model.parameters())
    grad_weight = sum(lin.in_features * lin.out_features for lin in linears
                      if not any(lin.name.endswith(s) for s in no_grad_suffixes))
    return Architecture(len(blocks), model.inner_dim, tuple(linears), other, total - in_blocks, grad_weight)
