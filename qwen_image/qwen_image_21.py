"""Qwen-Image-2.1 as one object, with the public surface of :class:`qwen_image.QwenImage` that training uses.

Qwen-Image-2.1 is a different network from Qwen-Image (1.x, 2512, Edit-2509/2511), with its own diffusers classes
(``QwenImage21Pipeline``, ``QwenImage21Transformer2DModel``, ``AutoencoderKLQwenImage21``):

* a 7.1 B single-stream transformer: text tokens, condition-image tokens and the target image's tokens form ONE
  sequence (block-causal attention; text and conditions are modulated at t = 0, so their keys and values do not
  change between sampler steps and can be cached);
* Qwen3-VL as text encoder, read BEFORE its final RMSNorm (the pipeline hooks the norm to return its input);
* an RGBA VAE with 64 latent channels and 16x downsampling, no 2x2 packing: one token per 16x16 px tile, latents
  packed by a plain flatten (B, h*w, 64); sizes are multiples of 32 px because each text-encoder image slot stands
  for a 2x2 group of tokens;
* text-to-image and editing (1+ condition images) in one model; CFG off by default (``true_cfg_scale`` 1.0, no
  norm rescale when on), 40 steps.

This module holds what differs: prompt encoding (:class:`PromptEncoder21`), RGBA pixels and the token layout
(:func:`images_to_pixels`, :func:`pixels_to_images`, :func:`pack`, :func:`unpack`; the VAE's normalised encode /
decode are :mod:`qwen_image.latents`' own), the velocity call (:func:`predict_velocity_21`, with the
condition KV cache of :class:`ConditionKVCache`), sigmas, LoRA targets/export, the architecture numbers, and the
bundle :class:`QwenImage21`. The ODE/SDE loop, SDE step and :class:`Conditioning` are the shared ones of
:mod:`qwen_image.sampling`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage21,
    FlowMatchEulerDiscreteScheduler,
    QwenImage21Pipeline,
    QwenImage21Transformer2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions
from PIL import Image
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from . import latents as latent_ops
from .errors import QwenImageInputError
from .images import to_rgba
from .model import ModelComponents, default_size_of, resolve_dtype, resolve_seeds
from .sampling import Conditioning, References, SampleOutput, sample, sde_noise_generators
from .scheduler import make_scheduler, shift_mu
from .text import pad_embeddings, validate_prompts
from .tokenizer import load_bundled_tokenizer, load_qwen3vl_processor, make_qwen3vl_processor

logger = logging.getLogger(__name__)

__all__ = [
    "QwenImage21", "PromptEncoder21", "ConditionKVCache", "Architecture21", "architecture_21",
    "predict_velocity_21", "inference_sigmas_21", "pack", "unpack", "img_shapes", "image_seq_len", "check_size",
    "LORA_TARGETS_21", "lora_config_21", "save_lora_21", "is_qwen_image_21_checkpoint",
]

VAE_SCALE_FACTOR = 16  # one latent token per 16x16 px
SIZE_MULTIPLE = 32  # one text-encoder image slot per 2x2 tokens
TOKENS_PER_SLOT = 4
PIPELINE_CLASS = QwenImage21Pipeline.__name__
REQUIRED_SUBFOLDERS = ("transformer", "vae", "text_encoder", "processor", "scheduler")
DEFAULT_STEPS = 40
DEFAULT_CFG = 1.0

# The prompt templates of QwenImage21Pipeline (tests check they are the pipeline's). Condition images come before
# the prompt, one "<imageN>" vision block each; the system message's tokens are dropped from the embeddings.
SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
T2I_TEMPLATE = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n"
                "<|im_start|>assistant\n")
VISION_BLOCK = "<image{}><|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

# LoRA targets: the seven Linears of every block (attention q/k/v/out and the SwiGLU MLP). The shared modulation,
# the input projections and the output head stay frozen, as in the other 2.1 trainers.
LORA_TARGETS_21 = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
                   "img_mlp.out")

# Tiny random 2.1 (the real classes, small configs): ~0.16 M transformer, ~0.16 M VAE, ~20 M Qwen3-VL (its
# embedding table is the real vocabulary's, so the real tokenizer works).
TINY_TRANSFORMER = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, context_in_dim=64,
                        axes_dims_rope=(8, 12, 12))
TINY_VAE = dict(base_dim=16, decoder_base_dim=16, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=151936,
                 rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                  "mrope_interleaved": True})
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                   spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                   deepstack_visual_indexes=[0])
QWEN3_VL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)
# Qwen3-VL-8B (hidden 4096 = the 2.1 transformer's context_in_dim): the text encoder the architecture numbers assume
# when no checkpoint is given.
QWEN3_VL_8B_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True})
QWEN3_VL_8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                          patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                          deepstack_visual_indexes=[8, 16, 24])


# --------------------------------------------------------------------------- sizes and latents
def check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
            near = max(SIZE_MULTIPLE, round((value if isinstance(value, int) else 0) / SIZE_MULTIPLE) * SIZE_MULTIPLE)
            raise QwenImageInputError(f"{name}={value!r} is not a positive multiple of {SIZE_MULTIPLE} px "
                                      f"(Qwen-Image-2.1); use e.g. {near}.")


def image_seq_len(height: int, width: int) -> int:
    """Target-image tokens of a ``height`` x ``width`` px image (what the time shift is computed from)."""
    return (height // VAE_SCALE_FACTOR) * (width // VAE_SCALE_FACTOR)


def img_shapes(batch_size: int, height: int, width: int) -> list[list[tuple[int, int, int]]]:
    """The target's grid per sample, as :func:`qwen_image.latents.img_shapes` (condition grids are added by the
    velocity call from the conditioning's references)."""
    return [[(1, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)]] * batch_size


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, C, 1, H, W) latents -> (B, H*W, C) tokens (2.1 has no 2x2 packing)."""
    if latents.dim() == 5:
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    return QwenImage21Pipeline._pack_latents(latents.contiguous(), b, c, h, w)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, L, C) tokens -> (B, C, 1, H/16, W/16) latents of a ``height`` x ``width`` px image."""
    expected = image_seq_len(height, width)
    if tokens.shape[1] != expected:
        raise QwenImageInputError(f"latents have {tokens.shape[1]} tokens; {height}x{width} px needs {expected}.")
    return QwenImage21Pipeline._unpack_latents(tokens, height, width, VAE_SCALE_FACTOR)


def image_processor() -> VaeImageProcessor:
    """The pipeline's image processor: lanczos resize, [-1, 1] tensors, channels kept (RGBA stays 4-channel)."""
    return VaeImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR, vae_latent_channels=64)


def images_to_pixels(images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """PIL images -> (B, 4, 1, H, W) RGBA in [-1, 1]; images without alpha get an opaque one."""
    processor = image_processor()
    return torch.cat([processor.preprocess(to_rgba(im), height=height, width=width) for im in images]).unsqueeze(2)


def pixels_to_images(pixels: torch.Tensor, mode: str = "RGB", background: tuple[int, int, int] = (255, 255, 255)
                     ) -> list[Image.Image]:
    """(B, 4, H, W) RGBA in [-1, 1] -> PIL images: ``mode="RGBA"`` as the pipeline returns them, ``"RGB"``
    composited over ``background`` (white: what the pipeline shows the text encoder for an RGBA image)."""
    if mode not in ("RGB", "RGBA"):
        raise QwenImageInputError(f"mode must be 'RGB' or 'RGBA', got {mode!r}.")
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    images = [Image.fromarray(a, mode="RGBA") for a in arr]
    if mode == "RGBA":
        return images
    out = []
    for im in images:
        canvas = Image.new("RGBA", im.size, (*background, 255))
        out.append(Image.alpha_composite(canvas, im).convert("RGB"))
    return out


def inference_sigmas_21(scheduler: FlowMatchEulerDiscreteScheduler, num_inference_steps: int, image_seq_len: int,
                        sample_sigmas: Sequence[float] | None = None) -> torch.Tensor:
    """The sigmas QwenImage21Pipeline walks through, terminal 0 appended: the checkpoint's ``sample_sigmas`` when it
    has them (their length is then the step count), else linspace(1, 1/steps), time-shifted for the image size."""
    if sample_sigmas is None:
        if num_inference_steps < 1:
            raise QwenImageInputError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        sample_sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    scheduler.set_timesteps(sigmas=np.asarray(sample_sigmas), mu=shift_mu(scheduler, image_seq_len))
    return scheduler.sigmas.to(torch.float32).clone()


# --------------------------------------------------------------------------- velocity
class ConditionKVCache:
    """Keys and values of the text and condition-image tokens, computed at the first sampler step and reused after.

    Valid because the 2.1 transformer (``causal_condition``) modulates those tokens at t = 0 and they attend only
    causally: their activations do not depend on the noisy target. Later steps then run only the target's tokens
    through the blocks: for an edit with one 1024² reference that halves the work per step; for text-to-image the
    prefix is a few hundred text tokens and the saving is small. Sampling only (no gradient flows into the cache);
    one cache per conditioning (the CFG negative gets its own), reset by making a new object per sampler run.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._caches: dict[str, QwenImage21KVCache] = {}
        self._conds: dict[str, Conditioning] = {}

    def mode_for(self, branch: str, cond: Conditioning) -> tuple[QwenImage21KVCache, str]:
        if branch not in self._caches:
            self._caches[branch] = QwenImage21KVCache(self.num_layers)
            self._conds[branch] = cond
            return self._caches[branch], "extract"
        if self._conds[branch] is not cond:
            raise ValueError("a ConditionKVCache is filled for one conditioning; make a new one per sampler run.")
        return self._caches[branch], "cached"


def _target_grid(shape) -> tuple[int, int, int]:
    """The target's (1, h, w) from a caller's per-sample entry: ``(1, h, w)`` or ``[(1, h, w)]``."""
    if len(shape) == 3 and all(isinstance(v, int) for v in shape):
        return tuple(shape)
    return tuple(shape[-1])


def transformer_img_mask(cond: Conditioning, target_tokens: int) -> torch.Tensor:
    """The transformer's ``img_mask``: the conditioning's image slots, then one slot per 2x2 target tokens."""
    batch, length = cond.embeds.shape[:2]
    slots = cond.img_mask
    if slots is None:  # text-only embeddings: no position holds an image slot
        slots = torch.zeros(batch, length, dtype=torch.bool, device=cond.embeds.device)
    slots = slots.to(cond.embeds.device).bool()
    if slots.shape[0] > 1 and bool((slots != slots[:1]).any()):
        raise ValueError("rows of a 2.1 conditioning have different image-slot layouts; the transformer reads one.")
    return torch.cat([slots, slots.new_ones(batch, target_tokens // TOKENS_PER_SLOT)], dim=1)


def predict_velocity_21(
    transformer: QwenImage21Transformer2DModel,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    cond: Conditioning,
    img_shapes: list,
    negative: Conditioning | None = None,
    true_cfg_scale: float = 1.0,
    attention_kwargs: dict | None = None,
    kv_cache: ConditionKVCache | None = None,
) -> torch.Tensor:
    """v = eps - x0 of the 2.1 transformer for packed target ``latents`` (B, L, 64) at noise level ``sigma``.

    Same signature as :func:`qwen_image.sampling.predict_velocity` (plus ``kv_cache``), so the shared samplers and
    losses call it unchanged. ``cond.references`` (condition images' packed latents) go BEFORE the target tokens and
    their grids before the target's, as QwenImage21Pipeline lays them out; only the target's velocity is returned.
    CFG (``true_cfg_scale > 1`` with a ``negative``): neg + s (pos - neg), without the norm rescale of Qwen-Image;
    both branches read ``cond``'s references; the negative branch carries no gradient.
    """
    batch, target_len = latents.shape[:2]
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(sigma)
    # The pipeline passes scheduler timesteps (sigma * 1000) divided by 1000: keep the same float path.
    timestep = (sigma.to(torch.float32) * 1000).expand(batch).to(latents.dtype).to(latents.device) / 1000
    refs = cond.references
    hidden = latents
    ref_shapes: list = []
    if refs is not None:
        if refs.latents.shape[0] != batch:
            raise ValueError(f"{refs.latents.shape[0]} rows of reference latents for a batch of {batch}")
        hidden = torch.cat([refs.latents.to(device=latents.device, dtype=latents.dtype), latents], dim=1)
        ref_shapes = list(refs.shapes)
    shapes = [ref_shapes + [_target_grid(s)] for s in img_shapes]
    use_cache = kv_cache is not None and transformer.config.causal_condition

    def forward(c: Conditioning, branch: str) -> torch.Tensor:
        cache, mode = kv_cache.mode_for(branch, c) if use_cache else (None, None)
        out = transformer(
            hidden_states=hidden, encoder_hidden_states=c.embeds, encoder_hidden_states_mask=c.mask,
            timestep=timestep, img_shapes=shapes, img_mask=transformer_img_mask(c, target_len),
            attention_kwargs=attention_kwargs, kv_cache=cache, kv_cache_mode=mode, return_dict=False,
        )[0]
        return out[:, -target_len:]

    v = forward(cond, "cond")
    if negative is None or true_cfg_scale <= 1.0:
        return v
    with torch.no_grad():
        v_neg = forward(negative, "uncond")
    return v_neg + true_cfg_scale * (v - v_neg)


# --------------------------------------------------------------------------- prompt encoding
def image_digest(image: Image.Image) -> str:
    return hashlib.sha1(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def prompt_text(prompt: str, n_images: int) -> str:
    """The pipeline's template for ``prompt`` with ``n_images`` condition images (0: text-to-image)."""
    prompt = prompt or " "  # Qwen has no bos token: an empty prompt would leave the encoder nothing to read
    if n_images == 0:
        return T2I_TEMPLATE.format(prompt)
    blocks = VISION_BLOCK.format(1) + "".join(" " + VISION_BLOCK.format(i) for i in range(2, n_images + 1))
    return T2I_TEMPLATE.format(blocks + prompt)


def flatten_alpha(image: Image.Image) -> Image.Image:
    """What the text encoder sees of an RGBA image: the alpha composited over white (as the pipeline does)."""
    if image.mode != "RGBA":
        return image
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


class PromptEncoder21:
    """Encodes prompts (with condition images for edits) exactly like ``QwenImage21Pipeline.encode_prompt``.

    The text encoder's last hidden state is taken BEFORE its final RMSNorm (a forward hook returns the norm's input,
    as the pipeline installs), padding and the system message's tokens are dropped, and a bool mask marks the
    vision slots of each condition image. Every prompt is encoded alone (batch 1): a prompt's embedding then does
    not depend on the prompts it is batched with (left padding would move it to other kernels and bits), which is
    what a cache needs; it equals the pipeline's encoding of that prompt bit for bit. Per-row LRU cache keyed by
    the prompt, the images' pixels and their size.
    """

    def __init__(self, processor, text_encoder: Qwen3VLForConditionalGeneration | None, cache_size: int = 256):
        self.processor = processor
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        system = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
        # Counted from the processor's own chat template, as the pipeline does (14 tokens with Qwen3-VL's).
        self.drop_tokens = len(processor.apply_chat_template(system, tokenize=True, return_dict=False)[0])
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _key(self, prompt: str, images: Sequence[Image.Image]) -> tuple:
        return (prompt, *(f"{im.size}{image_digest(im)}" for im in images))

    @torch.no_grad()
    def _encode_one(self, prompt: str, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None:
            raise QwenImageInputError(
                f"prompt {prompt[:60]!r} was not encoded before the text encoder was released; precompute every "
                "prompt first or keep the text encoder loaded.")
        kwargs = {"text": [prompt_text(prompt, len(images))], "padding": True, "padding_side": "left",
                  "return_tensors": "pt"}
        if images:
            kwargs["images"] = [flatten_alpha(im) for im in images]
        device = self.text_encoder.device
        inputs = self.processor(**kwargs).to(device)
        forward = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask, "output_hidden_states": True}
        if images and "pixel_values" in inputs:
            forward.update(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
        if "mm_token_type_ids" in inputs:
            forward["mm_token_type_ids"] = inputs.mm_token_type_ids
        # transformers 5 returns the NORMALISED state as hidden_states[-1]; 2.1 was trained on the pre-norm one.
        model = self.text_encoder.model
        text_model = getattr(model, "language_model", model)
        handle = text_model.norm.register_forward_hook(lambda module, args, output: args[0])
        try:
            hidden = self.text_encoder(**forward).hidden_states[-1]
        finally:
            handle.remove()
        valid = inputs.attention_mask[0].bool()
        embeds = hidden[0][valid][self.drop_tokens:]
        slots = (inputs.input_ids[0][valid] == self.image_token_id)[self.drop_tokens:]
        return embeds, slots

    def encode(self, prompts: str | list[str], images: Sequence[Sequence[Image.Image]] | None = None,
               device=None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded embeddings (B, L, D), 0/1 mask (B, L) and image-slot mask (B, L) bool. ``images``: one list
        of already-sized condition images per prompt (None: text-to-image)."""
        prompts = validate_prompts(prompts)
        rows = [list(r) for r in images] if images is not None else [[] for _ in prompts]
        if len(rows) != len(prompts):
            raise QwenImageInputError(f"got condition images for {len(rows)} rows but {len(prompts)} prompts.")
        keys = [self._key(p, r) for p, r in zip(prompts, rows)]
        for key, prompt, row in zip(keys, prompts, rows):
            if key not in self._cache:
                self._cache[key] = tuple(t.detach() for t in self._encode_one(prompt, row))
            self._cache.move_to_end(key)
        per_row = [self._cache[k] for k in keys]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        embeds, mask = pad_embeddings([e for e, _ in per_row], device=device, dtype=dtype)
        slots = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
        for i, (_, s) in enumerate(per_row):
            slots[i, : s.shape[0]] = s.to(mask.device)
        return embeds, mask, slots

    def precompute(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None,
                   batch_size: int = 1, progress: bool = False) -> int:
        """Encode every row once and keep it on CPU, so the text encoder can be released. Returns distinct rows.
        (``batch_size`` is accepted for :class:`qwen_image.text.PromptEncoder`'s signature: rows encode one by one.)"""
        from tqdm.auto import tqdm

        prompts = validate_prompts(list(prompts))
        rows = [list(r) for r in images] if images is not None else [[] for _ in prompts]
        todo = {self._key(p, r): (p, r) for p, r in zip(prompts, rows)}
        self.cache_size = max(self.cache_size, len(self._cache) + len(todo) + 256)
        for key, (p, r) in tqdm(todo.items(), disable=not progress, desc="Encoding prompts", leave=False):
            if key not in self._cache:
                self._cache[key] = tuple(t.detach().cpu() for t in self._encode_one(p, r))
        return len(todo)


# --------------------------------------------------------------------------- architecture numbers
@dataclass(frozen=True)
class Architecture21:
    """What a memory estimate needs of a 2.1 checkpoint. The first six fields mirror the Qwen-Image estimator's
    architecture record; ``block_linears`` holds ``(name, in_features, out_features, bias)`` per block Linear."""

    num_blocks: int
    inner_dim: int
    block_linears: tuple[tuple[str, int, int, bool], ...]
    block_other_params: int  # the q/k RMSNorm weights inside a block
    non_block_params: int  # shared modulation, input projections, text projection, output head, time embedding
    grad_weight_params: int  # Linear weights whose backward needs the weight (all block Linears: the input has grad)
    num_heads: int
    head_dim: int
    mlp_hidden_size: int
    context_in_dim: int
    transformer_params: int
    text_encoder_params: int  # the whole Qwen3-VL (vision tower and LM head included, as it loads)
    text_encoder_lm_params: int  # its language model alone (what encoding a text-only prompt runs)
    text_encoder_hidden_size: int
    text_encoder_layers: int
    vae_params: int
    vae_encoder_params: int
    vae_decoder_params: int
    vae_z_dim: int
    vae_scale_factor: int = VAE_SCALE_FACTOR

    @property
    def params_per_block(self) -> int:
        return sum(i * o + (o if b else 0) for _, i, o, b in self.block_linears) + self.block_other_params

    def image_tokens(self, height: int, width: int) -> int:
        return image_seq_len(height, width)


def _read_config(path: Path | None, sub: str) -> dict:
    if path is None or not (path / sub / "config.json").is_file():
        return {}
    return {k: v for k, v in json.loads((path / sub / "config.json").read_text()).items() if not k.startswith("_")}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=8)
def _architecture(path: str | None) -> Architecture21:
    root = Path(path) if path else None
    with torch.device("meta"):
        transformer = QwenImage21Transformer2DModel(**_read_config(root, "transformer"))
        vae = AutoencoderKLQwenImage21(**_read_config(root, "vae"))
        te_cfg = _read_config(root, "text_encoder")
        config = (Qwen3VLConfig(**te_cfg) if te_cfg else
                  Qwen3VLConfig(text_config=dict(QWEN3_VL_8B_TEXT), vision_config=dict(QWEN3_VL_8B_VISION),
                                tie_word_embeddings=False, **QWEN3_VL_IDS))
        text_encoder = Qwen3VLForConditionalGeneration(config)
    block = transformer.transformer_blocks[0]
    linears, linear_ids = [], set()
    for name, mod in block.named_modules():
        if isinstance(mod, torch.nn.Linear):
            linears.append((name, mod.in_features, mod.out_features, mod.bias is not None))
            linear_ids |= {id(p) for p in mod.parameters()}
    other = sum(p.numel() for p in block.parameters() if id(p) not in linear_ids)
    in_blocks = sum(_count(b) for b in transformer.transformer_blocks)
    total = _count(transformer)
    cfg = transformer.config
    lm = text_encoder.model.language_model
    return Architecture21(
        num_blocks=len(transformer.transformer_blocks), inner_dim=transformer.inner_dim, block_linears=tuple(linears),
        block_other_params=other, non_block_params=total - in_blocks,
        grad_weight_params=sum(i * o for _, i, o, _ in linears), num_heads=cfg.num_attention_heads,
        head_dim=cfg.attention_head_dim, mlp_hidden_size=transformer.inner_dim * cfg.mlp_ratio,
        context_in_dim=cfg.context_in_dim, transformer_params=total, text_encoder_params=_count(text_encoder),
        text_encoder_lm_params=_count(lm), text_encoder_hidden_size=lm.config.hidden_size,
        text_encoder_layers=lm.config.num_hidden_layers, vae_params=_count(vae),
        vae_encoder_params=_count(vae.encoder) + _count(vae.quant_conv),
        vae_decoder_params=_count(vae.decoder) + _count(vae.post_quant_conv), vae_z_dim=vae.config.z_dim,
    )


def architecture_21(path: str | os.PathLike | None = None) -> Architecture21:
    """Architecture numbers of a 2.1 checkpoint's configs (built on the meta device: no weights, ~1 s), or of the
    released 2.1 (diffusers' default transformer and VAE configs, Qwen3-VL-8B) when ``path`` is None."""
    return _architecture(str(Path(path).expanduser()) if path else None)


# --------------------------------------------------------------------------- LoRA
def lora_config_21(rank: int = 16, alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS_21,
                   init_lora_weights: bool | str = True):
    """A PEFT ``LoraConfig`` for the 2.1 transformer (default: the seven block Linears, alpha = rank)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets),
                      init_lora_weights=init_lora_weights)


def save_lora_21(transformer: QwenImage21Transformer2DModel, output_dir: str | os.PathLike,
                 adapter_name: str = "default", weight_name: str = "pytorch_lora_weights.safetensors") -> Path:
    """Write the adapter ``adapter_name`` of ``transformer`` as ``QwenImage21Pipeline.save_lora_weights`` does
    (keys ``transformer.<module>.lora_A/B.weight``, the LoraConfig in the header so alpha survives): the file
    ``QwenImage21Pipeline.load_lora_weights`` and :meth:`QwenImage21.load_lora` load."""
    from peft.utils import get_peft_model_state_dict

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    layers = {k: v.detach().to("cpu").contiguous() for k, v in layers.items()}
    QwenImage21Pipeline.save_lora_weights(
        output_dir, transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=transformer.peft_config[adapter_name].to_dict(), weight_name=weight_name,
    )
    return output_dir / weight_name


# --------------------------------------------------------------------------- the bundle
def is_qwen_image_21_checkpoint(path: str | os.PathLike) -> bool:
    """A diffusers-layout folder whose model_index.json names QwenImage21Pipeline."""
    index = Path(path).expanduser() / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS


def _check_checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise QwenImageInputError(
            f"checkpoint folder {str(path)!r} does not exist; pass the local folder of a diffusers-format "
            "Qwen-Image-2.1 checkpoint (model_index.json, transformer/, vae/, text_encoder/, processor/, scheduler/).")
    if not is_qwen_image_21_checkpoint(path):
        raise QwenImageInputError(f"{str(path)!r} is not a Qwen-Image-2.1 checkpoint (its model_index.json does not "
                                  f"name {PIPELINE_CLASS}); load Qwen-Image / 2512 / Edit checkpoints with QwenImage.")
    missing = [s for s in REQUIRED_SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise QwenImageInputError(f"{str(path)!r} is not a complete Qwen-Image-2.1 checkpoint: missing "
                                  f"{', '.join(missing)}/.")
    return path


class QwenImage21(ModelComponents):
    """Qwen-Image-2.1 as one object: encode prompts (with condition images), encode/decode RGBA latents, sample
    (ODE or SDE, text-to-image or edit), generate, edit, load LoRAs.

    The components are the diffusers / transformers classes themselves, so anything that takes a
    ``QwenImage21Pipeline`` works on them (:meth:`pipeline` builds one). Attribute names follow
    :class:`qwen_image.QwenImage`; 2.1's size helpers are methods here (``img_shapes``, ``image_seq_len``,
    ``check_size``, ``inference_sigmas``) and its velocity call is ``predict_velocity`` (a static method).
    """

    family = "qwen-image-2.1"
    size_multiple = SIZE_MULTIPLE
    vae_scale_factor = VAE_SCALE_FACTOR
    latent_channels = 64
    default_steps = DEFAULT_STEPS
    default_cfg = DEFAULT_CFG
    lora_targets = LORA_TARGETS_21
    predict_velocity = staticmethod(predict_velocity_21)

    def __init__(
        self,
        transformer: QwenImage21Transformer2DModel,
        vae: AutoencoderKLQwenImage21 | None,
        text_encoder: Qwen3VLForConditionalGeneration | None,
        processor,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        default_size: int = 1024,
        sample_sigmas: Sequence[float] | None = None,
        edit_model: bool = False,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.scheduler = scheduler or make_scheduler()
        self.default_size = default_size
        self.sample_sigmas = list(sample_sigmas) if sample_sigmas is not None else None
        # 2.1 does text-to-image and editing with one checkpoint; ``edit_model`` says whether THIS job's prompts
        # come with condition images (what the trainers' data paths ask), not what the checkpoint can do.
        self.edit_model = edit_model
        self.prompt_encoder = PromptEncoder21(processor, text_encoder)
        # The text encoder and the VAE read a condition image at the same size (unlike Edit-2509/2511).
        self.edit_reference_area = self.edit_condition_area = default_size**2
        self.image_processor = image_processor()

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny(cls, seed: int = 0, dtype: str | torch.dtype = torch.float32, edit: bool = False,
             **transformer_overrides) -> "QwenImage21":
        """The 2.1 architecture with tiny random weights (real classes; ~20 M parameters, nearly all the Qwen3-VL
        embedding table), built offline and seeded; default size 64 px. ``transformer_overrides`` change the
        transformer config (defaults: ``TINY_TRANSFORMER``)."""
        dtype = resolve_dtype(dtype)
        torch.manual_seed(seed)
        transformer = QwenImage21Transformer2DModel(**{**TINY_TRANSFORMER, **transformer_overrides})
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage21(**TINY_VAE)
        torch.manual_seed(seed + 2)
        config = Qwen3VLConfig(text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION), **QWEN3_VL_IDS)
        text_encoder = Qwen3VLForConditionalGeneration(config).eval()
        processor = make_qwen3vl_processor(load_bundled_tokenizer())
        model = cls(transformer, vae, text_encoder, processor, default_size=64, edit_model=edit)
        if dtype != torch.float32:
            model.to(dtype=dtype)
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        torch_dtype: str | torch.dtype | None = "bfloat16",
        device: str | torch.device | None = None,
        load_text_encoder: bool = True,
        load_vae: bool = True,
        edit_model: bool = False,
    ) -> "QwenImage21":
        """Load a local diffusers-format Qwen-Image-2.1 checkpoint (no download). ``load_text_encoder=False`` /
        ``load_vae=False`` skip components a job does not need (training on cached embeddings and latents)."""
        path = _check_checkpoint_dir(path)
        dtype = resolve_dtype(torch_dtype)
        transformer = QwenImage21Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKLQwenImage21.from_pretrained(path, subfolder="vae", torch_dtype=dtype) if load_vae else None
        text_encoder = (Qwen3VLForConditionalGeneration.from_pretrained(path / "text_encoder", dtype=dtype).eval()
                        if load_text_encoder else None)
        processor = load_qwen3vl_processor(str(path / "processor"))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        index = json.loads((path / "model_index.json").read_text())
        model = cls(transformer, vae, text_encoder, processor, scheduler, default_size_of(path),
                    sample_sigmas=index.get("sample_sigmas"), edit_model=edit_model)
        return model.frozen(device)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the diffusers layout that ``QwenImage21Pipeline.from_pretrained`` and :meth:`from_pretrained` load
        (the processor as ``transformers.Qwen3VLProcessor``; without torchvision pass ``processor=`` to the
        pipeline's ``from_pretrained``, as its video processor cannot be built)."""
        path = Path(path)
        self.pipeline().save_pretrained(path)
        index_file = path / "model_index.json"
        index = json.loads(index_file.read_text())
        index["processor"] = ["transformers", "Qwen3VLProcessor"]
        index_file.write_text(json.dumps(index, indent=2))
        (path / "qwen_image_align.json").write_text(json.dumps({"default_size": self.default_size}))
        return path

    def pipeline(self) -> QwenImage21Pipeline:
        """The diffusers pipeline over the same components."""
        return QwenImage21Pipeline(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                                   processor=self.processor, transformer=self.transformer,
                                   sample_sigmas=self.sample_sigmas)

    # ------------------------------------------------------------------ sizes (2.1's rules)
    check_size = staticmethod(check_size)
    image_seq_len = staticmethod(image_seq_len)
    img_shapes = staticmethod(img_shapes)
    pack = staticmethod(pack)
    unpack = staticmethod(unpack)

    def inference_sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        return inference_sigmas_21(self.scheduler, num_inference_steps, image_seq_len(height, width),
                                   self.sample_sigmas)

    def reference_size(self, image: Image.Image, area: int | None = None) -> tuple[int, int]:
        """(height, width) a condition image is resized to (both for the text encoder and the VAE): about
        ``area`` px (default: the model's default size squared) at the image's aspect ratio, sides multiples of
        32 (the pipeline's ``calculate_dimensions``)."""
        width, height, _ = calculate_dimensions(area or self.edit_reference_area, image.width / image.height)
        if width <= 0 or height <= 0:
            raise QwenImageInputError(f"a {image.width}x{image.height} condition image is too elongated; crop it "
                                      "closer to square.")
        return int(height), int(width)

    def default_target_size(self, references: Sequence[Image.Image]) -> tuple[int, int]:
        """The pipeline's output size for an edit: the last condition image's aspect ratio at the default area."""
        height, width = self.reference_size(references[-1], self.default_size**2)
        return height // SIZE_MULTIPLE * SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-to-image embeddings (B, L, D) and a 0/1 mask (B, L), cached per prompt (as QwenImage's)."""
        embeds, mask, _ = self.prompt_encoder.encode(prompts, device=self.device, dtype=self.dtype)
        return embeds, mask

    def _rows(self, images, n_rows: int) -> list[list[Image.Image]]:
        if isinstance(images, Image.Image):
            rows = [[images]] * n_rows
        elif isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
            rows = [list(images)] * n_rows
        elif isinstance(images, (list, tuple)) and images and all(isinstance(r, (list, tuple)) for r in images):
            rows = [list(r) for r in images]
        else:
            raise QwenImageInputError("condition images must be a PIL image, a list of PIL images shared by every "
                                      "prompt, or one such list per prompt.")
        if len(rows) != n_rows:
            raise QwenImageInputError(f"got condition images for {len(rows)} rows but {n_rows} prompts.")
        if any(not row or not all(isinstance(im, Image.Image) for im in row) for row in rows):
            raise QwenImageInputError("every row needs at least one condition image, each a PIL image.")
        return [[to_rgba(im) for im in row] for row in rows]

    def condition_images(self, images, n_rows: int, area: int | None = None
                         ) -> tuple[list[list[Image.Image]], list[list[tuple[int, int]]]]:
        """Each row's condition images as RGBA, resized for the text encoder (the pipeline's resize), and sizes."""
        rows = self._rows(images, n_rows)
        sizes = [[self.reference_size(im, area) for im in row] for row in rows]
        if any(s != sizes[0] for s in sizes):
            raise QwenImageInputError(f"condition-image sizes differ between rows ({sizes[0]} vs "
                                      f"{next(s for s in sizes if s != sizes[0])}); batch rows whose images share "
                                      "aspect ratios, or edit one row at a time.")
        resized = [[self.image_processor.resize(im, height=h, width=w) for im, (h, w) in zip(row, sz)]
                   for row, sz in zip(rows, sizes)]
        return resized, sizes

    @torch.no_grad()
    def references(self, images, n_rows: int, area: int | None = None) -> References:
        """The VAE side of an edit batch: each row's condition images, packed (B, sum h_i*w_i, 64), and grids."""
        self._require("vae")
        rows = self._rows(images, n_rows)
        sizes = [self.reference_size(im, area) for im in rows[0]]
        cache: dict[str, torch.Tensor] = {}
        per_row = []
        for row in rows:
            lat = []
            for im, (h, w) in zip(row, sizes):
                key = f"{h}x{w}{image_digest(im)}"
                if key not in cache:
                    pixels = self.image_processor.preprocess(im, height=h, width=w).unsqueeze(2)
                    cache[key] = pack(latent_ops.encode(self.vae, pixels))[0]
                lat.append(cache[key])
            per_row.append(torch.cat(lat))
        shapes = [(1, h // VAE_SCALE_FACTOR, w // VAE_SCALE_FACTOR) for h, w in sizes]
        return References(torch.stack(per_row).to(self.device, self.dtype), shapes)

    def conditioning(self, prompts: str | list[str], images=None, references: bool = True,
                     reference_area: int | None = None) -> Conditioning:
        """What conditions the transformer: the prompts alone (text-to-image), or with ``images`` (condition images
        shared by every prompt, or one list per prompt) the embeddings that read them, their image-slot mask and,
        unless ``references=False`` (a CFG negative: it shares the positive's), their VAE tokens. Condition images
        are resized to about ``reference_area`` px (None: the default size squared, as the pipeline)."""
        prompts = validate_prompts(prompts)
        if images is None:
            embeds, mask, slots = self.prompt_encoder.encode(prompts, device=self.device, dtype=self.dtype)
            return Conditioning.from_padded(embeds, mask, None, slots)
        resized, _ = self.condition_images(images, len(prompts), reference_area)
        embeds, mask, slots = self.prompt_encoder.encode(prompts, resized, device=self.device, dtype=self.dtype)
        refs = self.references(images, len(prompts), reference_area) if references else None
        return Conditioning.from_padded(embeds, mask, refs, slots)

    def precompute_conditioning(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None,
                                reference_area: int | None = None) -> int:
        """Encode every row (a prompt, with its condition images for an edit) once and keep it on CPU, so
        :meth:`conditioning` still serves these rows (at the same ``reference_area``: the text encoder reads the
        images at that size) after the text encoder is released. Returns distinct rows."""
        prompts = validate_prompts(list(prompts))
        if images is None:
            return self.prompt_encoder.precompute(prompts, progress=True)
        # Row by row: rows of other aspect ratios may not share one batch of condition images.
        resized = [self.condition_images([row], 1, reference_area)[0][0] for row in images]
        return self.prompt_encoder.precompute(prompts, resized, progress=True)

    # ------------------------------------------------------------------ latents
    def encode_images(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        """PIL images (RGB get an opaque alpha) -> normalised VAE latents (B, 64, 1, H/16, W/16)."""
        self._require("vae")
        check_size(height, width)
        return latent_ops.encode(self.vae, images_to_pixels(list(images), height, width))

    def decode_latents(self, latents: torch.Tensor, height: int | None = None, width: int | None = None,
                       mode: str = "RGB") -> list[Image.Image]:
        """Normalised latents, (B, 64, 1, h, w) or packed (B, L, 64) with height/width given -> PIL images:
        ``mode="RGB"`` composited over white (what rewards and exports read), ``"RGBA"`` with the decoded alpha
        (what the pipeline returns)."""
        self._require("vae")
        if latents.dim() == 3:
            if height is None or width is None:
                raise QwenImageInputError("packed latents need height and width to unpack.")
            latents = unpack(latents, height, width)
        return pixels_to_images(latent_ops.decode(self.vae, latents), mode)

    def initial_noise(self, batch: int, height: int, width: int, seed: int | Sequence[int] | None = 0
                      ) -> torch.Tensor:
        """Packed Gaussian noise (B, L, 64) drawn as the pipeline does with one generator per sample."""
        check_size(height, width)
        seeds = resolve_seeds(batch, seed)
        c = self.transformer.config.in_channels
        h, w = height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR
        noise = [torch.randn((1, 1, c, h, w), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
        noise = torch.cat(noise).to(self.device, self.dtype)
        return QwenImage21Pipeline._pack_latents(noise, batch, c, h, w)

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        prompts: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        true_cfg_scale: float = DEFAULT_CFG,
        negative_prompt: str | None = None,
        seed: int | Sequence[int] | None = 0,
        latents: torch.Tensor | None = None,
        noise_level: float = 0.0,
        sde_window: tuple[int, int] | None = None,
        record: bool = False,
        progress: bool = False,
        attention_kwargs: dict | None = None,
        images=None,
        use_kv_cache: bool = True,
        reference_area: int | None = None,
    ) -> SampleOutput:
        """Run the shared ODE/SDE sampler with 2.1's velocity call; returns packed latents (plus trajectory and
        log-probs when ``record`` / SDE). ``noise_level=0`` equals ``QwenImage21Pipeline(output_type="latent")``.

        ``images``: condition images (an edit); the output size then defaults to the last one's aspect ratio.
        ``use_kv_cache`` (as the pipeline's): the text/condition keys and values are computed at the first step and
        reused. Equal in fp32; in bf16 the cached steps may round differently from a full forward (GPU attention
        kernels tile the two sequence layouts differently), so a GRPO rollout whose log-probs training recomputes
        with full forwards should pass ``use_kv_cache=False`` to keep the first ratio exactly 1 (tested).
        """
        prompts = validate_prompts(prompts)
        if images is not None and (height is None or width is None):
            h0, w0 = self.default_target_size(self._rows(images, len(prompts))[0])
            height, width = height or h0, width or w0
        height = height or self.default_size
        width = width or self.default_size
        check_size(height, width)
        cond = self.conditioning(prompts, images, reference_area=reference_area)
        negative = None
        if negative_prompt is not None and true_cfg_scale > 1:
            negative = self.conditioning([negative_prompt] * len(prompts), images, references=False,
                                         reference_area=reference_area)
        seeds = resolve_seeds(len(prompts), seed)
        if latents is None:
            latents = self.initial_noise(len(prompts), height, width, seeds)
        seq_len = image_seq_len(height, width)
        if latents.shape[1] != seq_len:
            raise QwenImageInputError(f"latents have {latents.shape[1]} tokens; {height}x{width} px needs {seq_len}.")
        sigmas = self.inference_sigmas(num_inference_steps, height, width)
        cache = ConditionKVCache(len(self.transformer.transformer_blocks)) if use_kv_cache else None
        return sample(
            self.transformer, latents, sigmas, cond, img_shapes(len(prompts), height, width), negative=negative,
            true_cfg_scale=true_cfg_scale, noise_level=noise_level, sde_window=sde_window,
            generator=sde_noise_generators(seeds) if noise_level > 0 else None, record=record,
            attention_kwargs=attention_kwargs, progress=progress,
            velocity_fn=functools.partial(predict_velocity_21, kv_cache=cache),
        )

    @torch.no_grad()
    def generate(self, prompts: str | list[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int = DEFAULT_STEPS, true_cfg_scale: float = DEFAULT_CFG,
                 negative_prompt: str | None = None, seed: int | Sequence[int] | None = 0,
                 num_images_per_prompt: int = 1, mode: str = "RGB", progress: bool = True) -> list[Image.Image]:
        """Text-to-image: ``len(prompts) * num_images_per_prompt`` images (seeds seed, seed+1, ...)."""
        prompts = [p for p in validate_prompts(prompts) for _ in range(num_images_per_prompt)]
        height, width = height or self.default_size, width or self.default_size
        out = self.sample(prompts, height, width, num_inference_steps, true_cfg_scale, negative_prompt, seed,
                          progress=progress)
        return self.decode_latents(out.latents, height, width, mode)

    @torch.no_grad()
    def edit(self, images: Image.Image | Sequence[Image.Image], prompt: str,
             num_inference_steps: int = DEFAULT_STEPS, true_cfg_scale: float = DEFAULT_CFG,
             negative_prompt: str | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
             mode: str = "RGB") -> Image.Image:
        """Edit from one or more condition images with our sampler (equal to QwenImage21Pipeline; tested)."""
        validate_prompts([prompt], allow_empty_string=False)
        refs = [images] if isinstance(images, Image.Image) else list(images)
        out = self.sample([prompt], height, width, num_inference_steps, true_cfg_scale, negative_prompt, seed,
                          images=[refs])
        h, w = (height, width) if height and width else self.default_target_size([to_rgba(i) for i in refs])
        return self.decode_latents(out.latents, height or h, width or w, mode)[0]
