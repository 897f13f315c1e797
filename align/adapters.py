"""LoRA files in for training (``init_adapter``, the reference of a resumed adapter): the conversion of diffusers,
ComfyUI, ai-toolkit, kohya/musubi and DiffSynth files lives in :mod:`qwen_image.lora`, so ``QwenImage.load_lora``
reads the same files the same way; this module names the option in its errors and makes them ``UserError``s.

A LoRA file is checked twice: before any weights load (:func:`check_init_adapter`: the file is there, is a whole
``.safetensors`` file, and has the run's ``lora_rank``) and when it meets the transformer (:func:`load_lora_file`:
every layer has this model's shapes, so a LoRA of another model size is one line, not PEFT's size-mismatch
traceback)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from qwen_image.errors import QwenImageInputError, UserError
from qwen_image.lora import LORA_WEIGHT_NAME, _weights_file, read_lora_state_dict, to_peft_keys
from qwen_image.lora import load_lora_file as _load_lora_file

__all__ = ["LORA_WEIGHT_NAME", "load_lora_file", "check_init_adapter", "lora_file_summary"]
logger = logging.getLogger(__name__)
_DOWN = ("lora_A.weight", "lora_down.weight")


def _layout(keys: list[str]) -> str:
    """The trainer family a LoRA file's keys come from (for the log line; the loader reads them all)."""
    if any(k.startswith(("lora_unet_", "lora_transformer_")) for k in keys):
        return "kohya/musubi"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "ComfyUI"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    if any(k.startswith("pipe.dit.") or k.startswith("dit.") for k in keys):
        return "DiffSynth"
    return "PEFT" if any("lora_A" in k for k in keys) else "unknown"


def lora_file_summary(path: str | Path, option: str = "--init_adapter") -> dict[str, Any]:
    """{file, layout, rank, alpha, modules} of a LoRA file, read from its header and shapes only (no tensor data);
    a missing, truncated or non-safetensors file is a UserError naming ``option``."""
    from safetensors import SafetensorError, safe_open

    try:
        file = _weights_file(Path(path), option)
    except QwenImageInputError as err:
        raise UserError(str(err)) from None
    if file.suffix != ".safetensors":
        raise UserError(f"{option} {file}: only .safetensors LoRA files are read")
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in keys if k.endswith(_DOWN)}
            alphas = [float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")]
            header = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{option} {file}: not a readable .safetensors file ({err}); the file is truncated or of "
                        f"another format: copy or download it again") from None
    if not shapes:
        raise UserError(f"{option} {file}: holds no LoRA weights (no lora_A / lora_down tensors)")
    ranks = Counter(int(s[0]) for s in shapes.values())
    rank = ranks.most_common(1)[0][0]
    alpha: float | None = Counter(alphas).most_common(1)[0][0] if alphas else None
    if alpha is None and header.get("lora_adapter_metadata"):
        import json

        meta = json.loads(header["lora_adapter_metadata"])
        alpha = meta.get("transformer.lora_alpha", meta.get("lora_alpha"))
    return {"file": file, "layout": _layout(keys), "rank": rank, "ranks": dict(ranks),
            "alpha": rank if alpha is None else alpha, "modules": len(shapes)}


def check_init_adapter(config: Any) -> dict[str, Any] | None:
    """Before any weights load: ``init_adapter`` is a whole LoRA file whose rank is the run's ``lora_rank`` (a
    LoRA run continues the file's adapter at the file's rank: another ``--lora_rank`` would be silently ignored).
    Logs one line: the path, the layout, rank / alpha, and that the reference is the base model + this adapter."""
    path = getattr(config, "init_adapter", None)
    if not path:
        return None
    info = lora_file_summary(path, "--init_adapter")
    if config.finetune == "lora" and info["rank"] != config.lora_rank:
        raise UserError(f"--init_adapter {info['file']} has rank {info['rank']} (alpha {info['alpha']:g}), "
                        f"--lora_rank is {config.lora_rank}: training continues the file's adapter at its own rank; "
                        f"set --lora_rank {info['rank']} (or drop --init_adapter to train a new r{config.lora_rank} "
                        f"adapter)")
    mixed = f", ranks {info['ranks']}" if len(info["ranks"]) > 1 else ""
    what = ("trained further" if config.finetune == "lora" else "merged into the weights before full fine-tuning")
    logger.info("init_adapter: %s (%s layout, %d layers, rank %d, alpha %g%s), %s; the frozen reference, where the "
                "objective has one, is the base model + this adapter", info["file"], info["layout"], info["modules"],
                info["rank"], info["alpha"], mixed, what)
    return info


def _check_shapes(transformer: torch.nn.Module, path: str | Path, what: str) -> None:
    """Every LoRA layer of the file fits the module it names (a LoRA of another model size does not)."""
    state_dict, _ = read_lora_state_dict(path, what)
    modules = dict(transformer.named_modules())
    peft, _ = to_peft_keys(state_dict, [n for n in modules if n], what)
    for key, value in peft.items():
        name, part = key.rsplit(".lora_", 1)
        layer = modules[name]
        width = getattr(layer, "in_features", None) if part.startswith("A") else getattr(layer, "out_features", None)
        got = value.shape[1] if part.startswith("A") else value.shape[0]
        if width is not None and got != width:
            side = "input" if part.startswith("A") else "output"
            raise UserError(f"{what} {path}: a LoRA for another model size ({name} has {side} width {width} here, "
                            f"{got} in the file); use an adapter trained on this model")


def load_lora_file(transformer: torch.nn.Module, path: str | Path, adapter_name: str,
                   what: str = "--init_adapter") -> dict:
    """:func:`qwen_image.lora.load_lora_file` for ``init_adapter``: returns the adapter's LoraConfig kwargs."""
    try:
        _check_shapes(transformer, path, what)
        return _load_lora_file(transformer, path, adapter_name, what=what)
    except QwenImageInputError as err:
        raise UserError(str(err)) from None
