"""Adapter and model export: diffusers LoRA format (loads with ``QwenImagePipeline.load_lora_weights``), ComfyUI keys,
and full fine-tunes as a diffusers transformer folder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import QwenImagePipeline
from peft.utils import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from .adapters import LORA_WEIGHT_NAME
from .modeling import ADAPTER_NAME

COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"


def lora_layers(transformer: torch.nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """PEFT keys without the adapter name (``transformer_blocks.0.attn.to_q.lora_A.weight``), on CPU."""
    sd = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def adapter_metadata(transformer: torch.nn.Module) -> dict:
    # Without it diffusers reloads at scale 1 even when alpha != rank.
    return transformer.peft_config[ADAPTER_NAME].to_dict()


def module_alpha(metadata: dict, module: str) -> float:
    """The alpha PEFT gives ``module`` under the adapter config ``metadata`` (its ``alpha_pattern`` entry, else
    ``lora_alpha``): adapters loaded from other trainers can carry a different alpha per module."""
    pattern = metadata.get("alpha_pattern") or {}
    key = get_pattern_key(pattern.keys(), module)
    return float(pattern.get(key, metadata["lora_alpha"]))


def to_comfyui(layers: dict[str, torch.Tensor], metadata: dict) -> dict[str, torch.Tensor]:
    """ComfyUI's Qwen-Image LoRA keys: ``diffusion_model.<module>.lora_A/B.weight`` plus ``<module>.alpha`` (ComfyUI
    scales by alpha / rank, as PEFT does, so the file computes what the adapter does)."""
    out = {f"diffusion_model.{k}": v for k, v in layers.items()}
    for k in layers:
        if k.endswith(".lora_A.weight"):
            module = k.removesuffix(".lora_A.weight")
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(module_alpha(metadata, module))
    return out


def save_lora(
    transformer: torch.nn.Module,
    output_dir: str | Path,
    export_comfyui: bool = False,
    state_dict: dict | None = None,
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (keys ``transformer.…``, adapter metadata in the header)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    layers = lora_layers(transformer, state_dict)
    metadata = adapter_metadata(transformer)
    QwenImagePipeline.save_lora_weights(
        output_dir, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata,
        weight_name=LORA_WEIGHT_NAME,
    )
    if export_comfyui:
        save_file(to_comfyui(layers, metadata), output_dir / COMFYUI_WEIGHT_NAME,
                  metadata={"format": "pt"})
    return output_dir / LORA_WEIGHT_NAME


def save_full(transformer: torch.nn.Module, output_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write a diffusers ``transformer/`` folder (``QwenImageTransformer2DModel.from_pretrained(dir, subfolder='transformer')``)."""
    target = Path(output_dir) / "transformer"
    if state_dict is None:
        transformer.save_pretrained(target)
        return target
    # diffusers' save_pretrained silently ignores a state_dict argument and reads the module itself, which is
    # sharded under FSDP2 (crash) or ZeRO-3 (writes empty tensors): write the gathered state dict ourselves.
    import json

    from huggingface_hub import split_torch_state_dict_into_shards

    target.mkdir(parents=True, exist_ok=True)
    transformer.save_config(target)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    split = split_torch_state_dict_into_shards(tensors, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                               max_shard_size="10GB")
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, target / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (target / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return target
