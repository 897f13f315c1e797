"""Tiny random Qwen-Image: the real classes with small configs, seeded and offline (tests and the CPU demo)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

TINY_TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=False,
)
# Real latents_mean/std stay the VAE defaults, so the normalisation path is the real one.
TINY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    vocab_size=152064, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 4]},
)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[1])
SPECIAL_IDS = dict(vision_start_token_id=151652, vision_end_token_id=151653, image_token_id=151655, video_token_id=151656)


def tiny_transformer(seed: int = 0, **overrides) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**{**TINY_TRANSFORMER, **overrides})


def tiny_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    torch.manual_seed(seed + 1)
    return AutoencoderKLQwenImage(**TINY_VAE)


def tiny_text_encoder(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed + 2)
    config = Qwen2_5_VLConfig(text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION), **SPECIAL_IDS)
    return Qwen2_5_VLForConditionalGeneration(config).eval()
