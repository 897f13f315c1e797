"""LoRA files in and out: every foreign key layout, built from one known PEFT adapter with alpha != rank (and a module
with its own rank and alpha), loads through ``init_adapter`` and computes the same transformer output; the ComfyUI
export loads back through diffusers' ``QwenImagePipeline.load_lora_weights`` and computes it too."""

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from align.adapters import load_lora_file
from align.configs import QwenImageTrainingConfig
from align.export import COMFYUI_WEIGHT_NAME, adapter_metadata, lora_layers, module_alpha, save_lora, to_comfyui
from align.modeling import ADAPTER_NAME, prepare_transformer
from qwen_image.latents import img_shapes
from qwen_image.sampling import Conditioning, predict_velocity
from qwen_image.tiny import tiny_transformer

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "img_mlp.net.2", "txt_mod.1"]


class _Bundle:  # prepare_transformer only reads .transformer
    def __init__(self, transformer):
        self.transformer = transformer


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, 64, generator=g)  # 64x64 px -> 4x4 packed tokens
    cond = Conditioning(torch.randn(batch, 5, 32, generator=g), None)
    return latents, torch.rand(batch, generator=g), cond, img_shapes(batch, 64, 64)


@pytest.fixture(scope="module")
def known():
    """A trained-looking adapter: r=4 / alpha=8, to_k at rank 2, to_v with alpha 3; its output on fixed inputs."""
    transformer = tiny_transformer(seed=0)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"to_k": 2},
                                       alpha_pattern={"to_v": 3.0}, init_lora_weights="gaussian"),
                            adapter_name=ADAPTER_NAME)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        v = predict_velocity(transformer.eval(), *_inputs())
    layers, metadata = lora_layers(transformer), adapter_metadata(transformer)
    assert not torch.allclose(v, predict_velocity(tiny_transformer(seed=0).eval(), *_inputs()), atol=1e-3)
    return transformer, layers, metadata, v


def _modules(layers):
    return sorted(k.removesuffix(".lora_A.weight") for k in layers if k.endswith(".lora_A.weight"))


def _folded_b(layers, metadata, module):
    """lora_B with alpha / rank folded in: what a trainer that always uses alpha = rank would have saved."""
    rank = layers[f"{module}.lora_A.weight"].shape[0]
    return layers[f"{module}.lora_B.weight"] * (module_alpha(metadata, module) / rank)


def _diffusers_with_alpha(layers, metadata):
    out = {f"transformer.{k}": v for k, v in layers.items()}
    out.update({f"transformer.{m}.alpha": torch.tensor(module_alpha(metadata, m)) for m in _modules(layers)})
    return out


def _kohya(layers, metadata):
    out = {}
    for m in _modules(layers):
        flat = "lora_unet_" + m.replace(".", "_")
        out[f"{flat}.lora_down.weight"] = layers[f"{m}.lora_A.weight"]
        out[f"{flat}.lora_up.weight"] = layers[f"{m}.lora_B.weight"]
        out[f"{flat}.alpha"] = torch.tensor(module_alpha(metadata, m))
    return out


def _ai_toolkit(layers, metadata):  # ComfyUI keys, no alpha keys: alpha = rank
    out = {}
    for m in _modules(layers):
        out[f"diffusion_model.{m}.lora_A.weight"] = layers[f"{m}.lora_A.weight"]
        out[f"diffusion_model.{m}.lora_B.weight"] = _folded_b(layers, metadata, m)
    return out


def _diffsynth(layers, metadata):  # no prefix, PEFT's ".default." adapter name, alpha = rank
    out = {}
    for m in _modules(layers):
        out[f"{m}.lora_A.default.weight"] = layers[f"{m}.lora_A.weight"]
        out[f"{m}.lora_B.default.weight"] = _folded_b(layers, metadata, m)
    return out


FORMATS = {
    "comfyui": to_comfyui,
    "diffusers_with_alpha_keys": _diffusers_with_alpha,
    "kohya_musubi": _kohya,
    "ai_toolkit": _ai_toolkit,
    "diffsynth": _diffsynth,
}


def _config(tmp_path, init_adapter):
    return QwenImageTrainingConfig(output_dir=str(tmp_path), lora_rank=16, lora_alpha=16, report_to=[],
                                   init_adapter=str(init_adapter))


@pytest.mark.parametrize("fmt", ["diffusers"] + sorted(FORMATS))
def test_init_adapter_loads_every_format_with_the_same_output(known, fmt, tmp_path):
    source, layers, metadata, v_known = known
    if fmt == "diffusers":
        path = save_lora(source, tmp_path / "adapter")  # our own export, alpha in the header
    else:
        path = tmp_path / f"{fmt}.safetensors"
        save_file({k: v.contiguous() for k, v in FORMATS[fmt](layers, metadata).items()}, path)
    policy = prepare_transformer(_Bundle(tiny_transformer(seed=0)), _config(tmp_path, path))
    with torch.no_grad():
        v = predict_velocity(policy.eval(), *_inputs())
    torch.testing.assert_close(v, v_known, atol=1e-5, rtol=1e-4)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in policy.named_parameters() if "lora_" in n} and len(trainable) == len(layers)
    assert all(p.dtype == torch.float32 for n, p in policy.named_parameters() if p.requires_grad)
    config = policy.peft_config[ADAPTER_NAME]
    if fmt in ("ai_toolkit", "diffsynth"):  # alpha = rank in those files: scale 1 everywhere
        assert config.lora_alpha == config.r == 4
    else:  # alpha kept, not folded into the weights: training resumes with the same per-factor learning rate
        assert (config.r, config.lora_alpha) == (4, 8)
        assert {module_alpha(config.to_dict(), m) for m in _modules(layers) if m.endswith("to_v")} == {3.0}


def test_lycoris_and_foreign_keys_are_one_line_errors(tmp_path):
    lokr = tmp_path / "lokr.safetensors"
    save_file({"lora_unet_transformer_blocks_0_attn_to_q.lokr_w1": torch.zeros(2, 2),
               "lora_unet_transformer_blocks_0_attn_to_q.lokr_w2": torch.zeros(8, 8)}, lokr)
    loha = tmp_path / "loha.safetensors"
    save_file({"diffusion_model.transformer_blocks.0.attn.to_q.hada_w1_a": torch.zeros(4, 2)}, loha)
    other = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_0_attentions_0.lora_up.weight": torch.zeros(8, 2)}, other)
    for path, match in [(lokr, "LyCORIS"), (loha, "LyCORIS"), (other, "name no LoRA"),
                        (tmp_path / "missing", "does not exist")]:
        with pytest.raises(ValueError, match=match) as err:
            load_lora_file(tiny_transformer(seed=0), path, ADAPTER_NAME)
        assert "\n" not in str(err.value)


def test_comfyui_export_loads_back_through_diffusers_with_the_same_output(known, tmp_path, tiny_model):
    from diffusers import QwenImagePipeline

    source, layers, metadata, v_known = known
    save_lora(source, tmp_path / "out", export_comfyui=True)
    pipe = QwenImagePipeline(scheduler=tiny_model.scheduler, vae=tiny_model.vae, text_encoder=tiny_model.text_encoder,
                             tokenizer=tiny_model.tokenizer, transformer=tiny_transformer(seed=0))
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name=COMFYUI_WEIGHT_NAME, adapter_name="comfy")
    with torch.no_grad():
        v = predict_velocity(pipe.transformer.eval(), *_inputs())
    torch.testing.assert_close(v, v_known, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["diffusers", "diffusers_with_alpha_keys", "kohya_musubi"])
def test_qwen_image_load_lora_reads_the_same_files_with_the_same_output(known, fmt, tmp_path):
    # QwenImage.load_lora goes through the same conversion as init_adapter: a diffusers-style file that also has
    # .alpha keys (alpha != rank; diffusers' own loader doubles its prefix) loads and computes the known adapter.
    from qwen_image import QwenImage

    source, layers, metadata, v_known = known
    if fmt == "diffusers":
        path = save_lora(source, tmp_path / "adapter")
    else:
        path = tmp_path / f"{fmt}.safetensors"
        save_file({k: v.contiguous() for k, v in FORMATS[fmt](layers, metadata).items()}, path)
    model = QwenImage.tiny(seed=0)
    model.load_lora(path, adapter_name="style")
    with torch.no_grad():
        v = predict_velocity(model.transformer.eval(), *_inputs())
        torch.testing.assert_close(v, v_known, atol=1e-5, rtol=1e-4)
        model.transformer.set_adapters(["style"], [0.0])  # the scale is the adapter's: 0 gives the base model
        torch.testing.assert_close(predict_velocity(model.transformer, *_inputs()),
                                   predict_velocity(tiny_transformer(seed=0).eval(), *_inputs()), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="LoRA .* does not exist"):
        model.load_lora(tmp_path / "missing.safetensors", adapter_name="other")
