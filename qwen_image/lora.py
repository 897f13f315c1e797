"""LoRA files in: load diffusers, ComfyUI, ai-toolkit, kohya/musubi and DiffSynth Qwen-Image LoRAs as a PEFT adapter.
Used by ``QwenImage.load_lora`` (inference) and by training's ``init_adapter`` (``align.adapters``) alike.

The key styles (docs/adapters.md has the table)::

    diffusers / PEFT   transformer.transformer_blocks.0.attn.to_q.lora_A.weight      alpha in the file's metadata
    ComfyUI, ai-toolkit diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight (+ ....to_q.alpha)
    kohya / musubi     lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight      (+ ....alpha)
    DiffSynth          transformer_blocks.0.attn.to_q.lora_A.default.weight          alpha = rank

Why not just ``QwenImagePipeline.lora_state_dict``: it converts these too, but folds alpha/rank into the A/B weights
(the resumed adapter then trains with another per-factor learning rate), and a diffusers-style file that also has
``.alpha`` keys comes out with doubled ``transformer.transformer.`` keys (diffusers 0.42.1). Here every file becomes
PEFT keys plus a ``LoraConfig`` whose ``rank_pattern`` / ``alpha_pattern`` keep each module's rank and alpha, and
kohya's underscored names are matched against the transformer's own module names instead of a fixed word list.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .errors import QwenImageInputError

__all__ = ["read_lora_state_dict", "lora_config_from_state_dict", "load_lora_file"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
_PREFIXES = ("diffusion_model.", "transformer.", "lora_unet_", "base_model.model.")
# Suffix of a key -> its PEFT suffix ("" = the module's alpha).
_SUFFIXES = {
    ".lora_A.weight": ".lora_A.weight", ".lora_B.weight": ".lora_B.weight",
    ".lora_A.default.weight": ".lora_A.weight", ".lora_B.default.weight": ".lora_B.weight",
    ".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight",
    ".alpha": "",
}
_LYCORIS = ("lokr_", "hada_", ".oft_", "lora_mid")


def _weights_file(path: Path, what: str) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise QwenImageInputError(f"{what} {str(path)!r} does not exist.")
    if (path / LORA_WEIGHT_NAME).is_file():
        return path / LORA_WEIGHT_NAME
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise QwenImageInputError(f"{what} {str(path)!r}: expected {LORA_WEIGHT_NAME} or exactly one .safetensors file, "
                         f"found {[f.name for f in files]}; pass the file itself.")
    return files[0]


def read_lora_state_dict(path: str | Path, what: str = "LoRA") -> tuple[dict[str, torch.Tensor], dict | None]:
    """The raw tensors of a LoRA ``.safetensors`` file (or of the one in a folder) and the LoraConfig kwargs that
    diffusers stores in its header (``lora_adapter_metadata``), if any."""
    file = _weights_file(Path(path), what)
    if file.suffix != ".safetensors":
        raise QwenImageInputError(f"{what} {str(file)!r}: only .safetensors LoRA files are read.")
    state_dict = load_file(file)
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
    raw = header.get("lora_adapter_metadata")
    metadata = None
    if raw:
        metadata = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    return state_dict, metadata


def _module_and_suffix(key: str, modules: dict[str, str]) -> tuple[str, str] | None:
    suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return None
    name, peft_suffix = key[: -len(suffix)], _SUFFIXES[suffix]
    # kohya/musubi flatten the module path with underscores: ``modules`` maps that spelling to the dotted name too.
    for candidate in [name] + [name.removeprefix(p) for p in _PREFIXES if name.startswith(p)]:
        if candidate in modules:
            return modules[candidate], peft_suffix
    return None


def to_peft_keys(state_dict: dict[str, torch.Tensor], module_names: list[str],
                 what: str = "LoRA") -> tuple[dict, dict[str, float]]:
    """PEFT keys (``<module>.lora_A.weight`` / ``lora_B``) and each module's alpha (when the file has ``.alpha``)."""
    lycoris = sorted({k for k in state_dict if any(tag in k for tag in _LYCORIS)})
    if lycoris:
        raise QwenImageInputError(f"{what} is a LyCORIS (LoKr/LoHa) adapter ({lycoris[0]}); only LoRA files "
                         "(lora_A/lora_B or lora_down/lora_up) can be loaded.")
    # Dotted names and their underscored (kohya) spelling both map to the dotted name.
    modules = {n: n for n in module_names} | {n.replace(".", "_"): n for n in module_names}
    peft, alphas, unknown = {}, {}, []
    for key, value in state_dict.items():
        found = _module_and_suffix(key, modules)
        if found is None:
            unknown.append(key)
        elif found[1]:
            peft[found[0] + found[1]] = value
        else:
            alphas[found[0]] = float(value)
    if unknown:
        raise QwenImageInputError(f"{what} has {len(unknown)} key(s) that name no LoRA of a QwenImageTransformer2DModel "
                         f"module, e.g. {unknown[0]!r}; see docs/adapters.md for the formats read.")
    for name in {k.rsplit(".lora_", 1)[0] for k in peft}:
        if f"{name}.lora_A.weight" not in peft or f"{name}.lora_B.weight" not in peft:
            raise QwenImageInputError(f"{what}: module {name} lacks its lora_A or lora_B weight.")
    return peft, alphas


def lora_config_from_state_dict(peft: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict:
    """``LoraConfig`` kwargs reproducing the file: the commonest rank and alpha, ``rank_pattern``/``alpha_pattern``
    for modules that differ; a module without an alpha has alpha = its rank (scale 1, the diffusers convention)."""
    ranks = {k.removesuffix(".lora_A.weight"): int(v.shape[0]) for k, v in peft.items() if k.endswith(".lora_A.weight")}
    alpha = {name: alphas.get(name, float(rank)) for name, rank in ranks.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alpha.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        # Full module names: PEFT matches a pattern key against the end of each module's name.
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alpha.items() if v != lora_alpha},
        "target_modules": sorted(ranks),
    }


def load_lora_file(transformer: torch.nn.Module, path: str | Path, adapter_name: str, what: str = "LoRA") -> dict:
    """Load the LoRA at ``path`` (any format above) into ``transformer`` as ``adapter_name``; returns its LoraConfig
    kwargs. The adapter computes exactly what the file's trainer computed: same ranks, alphas and weights.
    ``what`` names the path in errors (the option it came from)."""
    state_dict, metadata = read_lora_state_dict(path, what)
    module_names = [n for n, _ in transformer.named_modules() if n]
    peft, alphas = to_peft_keys(state_dict, module_names, what)
    if metadata is None or alphas:  # no diffusers header, or alphas in the keys: the keys say it all
        metadata = lora_config_from_state_dict(peft, alphas)
    transformer.load_lora_adapter(peft, prefix=None, adapter_name=adapter_name, metadata=metadata)
    return metadata
