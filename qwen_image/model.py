"""QwenImage: the complete model bundle (text encoder, VAE, MMDiT transformer, scheduler) and its samplers."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Self, Sequence

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPlusPipeline,
    QwenImageInpaintPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from . import latents as latent_ops
from .edit import CONDITION_SIDE_FRACTION, EditEncoder, normalize_references
from .errors import QwenImageInputError
from .sampling import Conditioning, SampleOutput, predict_velocity, sample, sde_noise_generators
from .scheduler import inference_sigmas, make_scheduler
from .text import PromptEncoder, validate_prompts
from .tiny import tiny_text_encoder, tiny_transformer, tiny_vae
from .tokenizer import load_bundled_tokenizer, load_processor, make_processor

logger = logging.getLogger(__name__)
# Transformer configs that tell the edit generations apart: Edit-2511 modulates reference tokens at t = 0.
EDIT_VARIANTS = {"2509": {"zero_cond_t": False}, "2511": {"zero_cond_t": True}}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
REQUIRED_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise QwenImageInputError(f"unknown dtype {dtype!r}; use one of: {', '.join(sorted(set(DTYPES)))}.")


def resolve_seeds(batch: int, seed: int | Sequence[int] | None) -> list[int]:
    """One integer seed per image: ``seed, seed + 1, ...`` for an int, the list as given, fresh random seeds for None."""
    if isinstance(seed, (list, tuple)):
        seeds = [int(s) for s in seed]
    elif seed is None:
        seeds = [secrets.randbelow(2**31 - 1) for _ in range(batch)]  # leaves torch's global RNG alone
    else:
        seeds = [int(seed) + i for i in range(batch)]
    if len(seeds) != batch:
        raise QwenImageInputError(f"got {len(seeds)} seeds for {batch} images.")
    return seeds


def check_checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise QwenImageInputError(
            f"checkpoint folder {str(path)!r} does not exist; pass the local folder of a diffusers-format "
            "Qwen-Image checkpoint (with model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)."
        )
    missing = [s for s in REQUIRED_SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise QwenImageInputError(
            f"{str(path)!r} is not a diffusers-format Qwen-Image checkpoint: missing {', '.join(missing)}/."
        )
    return path


class ModelComponents:
    """What every bundle of this package (:class:`QwenImage`, ``qwen_image.qwen_image_21.QwenImage21``) does the
    same way over its diffusers components: move them, report the transformer's device and dtype, load a LoRA file
    into the transformer, and refuse a call that needs a component the bundle was loaded without."""

    transformer: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Self:
        # Only pass what is set: diffusers warns about any dtype keyword, even None.
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.transformer, self.vae, self.text_encoder):
            if module is not None and kwargs:
                module.to(**kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def load_lora(self, path: str | os.PathLike, adapter_name: str = "default", scale: float = 1.0) -> None:
        """Load a LoRA (diffusers, ComfyUI, ai-toolkit, kohya/musubi or DiffSynth keys: :mod:`qwen_image.lora`) into
        the transformer, with each module's rank and alpha as in the file, active at ``scale``."""
        from .lora import load_lora_file

        load_lora_file(self.transformer, path, adapter_name)
        self.transformer.set_adapters([adapter_name], [scale])

    def _require(self, name: str):
        if getattr(self, name) is None:
            raise QwenImageInputError(f"this {type(self).__name__} was loaded without its {name}; load it to use "
                                      "this method.")

    def frozen(self, device: str | torch.device | None = None) -> Self:
        """Every loaded component without gradients (training adds its own adapters), on ``device`` if given: how
        ``from_pretrained`` hands a checkpoint over."""
        for module in (self.transformer, self.vae, self.text_encoder):
            if module is not None:
                module.requires_grad_(False)
        if device is not None:
            self.to(device)
        return self


class QwenImage(ModelComponents):
    """Qwen-Image as one object: encode prompts, encode/decode latents, sample (ODE or SDE), generate, edit, inpaint.

    Components are the diffusers / transformers classes themselves, so anything that takes a
    ``QwenImagePipeline`` (LoRA loading, offload, attention backends) works on them.

    What differs between model families is reached through the bundle (training code never imports a family's
    module functions): the velocity call ``predict_velocity`` (the signature of
    :func:`qwen_image.sampling.predict_velocity`), the size rules ``check_size`` / ``image_seq_len`` /
    ``img_shapes``, the token layout ``pack`` / ``unpack`` / ``latent_channels`` and ``inference_sigmas``.
    :class:`qwen_image.qwen_image_21.QwenImage21` has the same surface.
    """

    family = "qwen-image"
    latent_channels = 64  # width of a packed token: 16 VAE channels x 2x2
    size_multiple = latent_ops.SIZE_MULTIPLE
    predict_velocity = staticmethod(predict_velocity)
    check_size = staticmethod(latent_ops.check_size)
    image_seq_len = staticmethod(latent_ops.image_seq_len)
    img_shapes = staticmethod(latent_ops.img_shapes)
    pack = staticmethod(latent_ops.pack)
    unpack = staticmethod(latent_ops.unpack)

    def __init__(
        self,
        transformer: QwenImageTransformer2DModel,
        vae: AutoencoderKLQwenImage | None,
        text_encoder: Qwen2_5_VLForConditionalGeneration | None,
        tokenizer: Qwen2Tokenizer,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        processor=None,
        default_size: int = 1024,
        edit_model: bool = False,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler or make_scheduler()
        self.processor = processor
        self.default_size = default_size
        self.prompt_encoder = PromptEncoder(tokenizer, text_encoder)
        # Edit models (Edit-2509 / 2511): references go through Qwen2.5-VL at the condition area and through the
        # VAE at the reference area; EditPlus's 384² and 1024² px scale with the default size (tiny: 24², 64²).
        self.edit_model = edit_model
        self.edit_condition_area = round(default_size * CONDITION_SIDE_FRACTION) ** 2
        self.edit_reference_area = default_size**2
        self.edit_encoder = EditEncoder(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny(
        cls, seed: int = 0, dtype: str | torch.dtype = torch.float32, edit: bool = False, **transformer_overrides
    ) -> "QwenImage":
        """The same architecture with tiny random weights (about 12 M parameters); fully offline and seeded.

        ``transformer_overrides`` change the transformer config (e.g. ``num_layers=4`` for the CPU demo's larger
        variant, ``zero_cond_t=True`` for an Edit-2511 layout); the defaults stay those of
        ``qwen_image.tiny.TINY_TRANSFORMER``. ``edit=True`` marks it an edit model (its Qwen2.5-VL already has a
        tiny vision tower and the bundle an offline Qwen2-VL processor); see :meth:`tiny_edit`.
        """
        dtype = resolve_dtype(dtype)
        tokenizer = load_bundled_tokenizer()
        model = cls(
            transformer=tiny_transformer(seed, **transformer_overrides),
            vae=tiny_vae(seed),
            text_encoder=tiny_text_encoder(seed),
            tokenizer=tokenizer,
            processor=make_processor(tokenizer),
            default_size=64,
            edit_model=edit,
        )
        if dtype != torch.float32:
            model.to(dtype=dtype)
        return model

    @classmethod
    def tiny_edit(cls, variant: str = "2509", seed: int = 0, dtype: str | torch.dtype = torch.float32, **overrides) -> "QwenImage":
        """A tiny edit model laid out like Qwen-Image-Edit-``variant``: "2509", or "2511" (``zero_cond_t``)."""
        if variant not in EDIT_VARIANTS:
            raise QwenImageInputError(f"unknown edit variant {variant!r}; use one of {sorted(EDIT_VARIANTS)}.")
        return cls.tiny(seed=seed, dtype=dtype, edit=True, **{**EDIT_VARIANTS[variant], **overrides})

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        torch_dtype: str | torch.dtype | None = "bfloat16",
        device: str | torch.device | None = None,
        load_text_encoder: bool = True,
        load_vae: bool = True,
    ) -> "QwenImage":
        """Load a local diffusers-format checkpoint (Qwen-Image, Qwen-Image-2512, Qwen-Image-Edit-2509/2511 layouts).

        ``load_text_encoder=False`` / ``load_vae=False`` skip components a job does not need (e.g. training on
        cached embeddings and latents).
        """
        path = check_checkpoint_dir(path)
        dtype = resolve_dtype(torch_dtype)
        transformer = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKLQwenImage.from_pretrained(path, subfolder="vae", torch_dtype=dtype) if load_vae else None
        text_encoder = (
            Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder", dtype=dtype).eval()
            if load_text_encoder else None
        )
        tokenizer = Qwen2Tokenizer.from_pretrained(path / "tokenizer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        processor = load_processor(str(path / "processor"), tokenizer) if (path / "processor").is_dir() else make_processor(tokenizer)
        default_size = default_size_of(path)
        model = cls(transformer, vae, text_encoder, tokenizer, scheduler, processor, default_size,
                    edit_model=is_edit_checkpoint(path))
        return model.frozen(device)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the diffusers layout (model_index.json + subfolders) that ``QwenImagePipeline.from_pretrained`` loads."""
        path = Path(path)
        self.pipeline().save_pretrained(path)
        if self.edit_model:  # what marks an edit checkpoint (the Edit pipeline's class name in model_index.json)
            index = json.loads((path / "model_index.json").read_text())
            index["_class_name"] = QwenImageEditPlusPipeline.__name__
            index["processor"] = ["transformers", "Qwen2VLProcessor"]
            (path / "model_index.json").write_text(json.dumps(index, indent=2))
        if self.processor is not None:
            self.processor.image_processor.save_pretrained(path / "processor")
            self.tokenizer.save_pretrained(path / "processor")
        with open(path / "qwen_image_align.json", "w") as f:
            json.dump({"default_size": self.default_size}, f)
        return path

    # ------------------------------------------------------------------ pipelines (diffusers)
    def pipeline(self, kind: str = "t2i"):
        """A diffusers pipeline over the same components: 't2i', 'edit' (Edit-2509 style), 'inpaint'."""
        common = dict(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                      tokenizer=self.tokenizer, transformer=self.transformer)
        if kind == "t2i":
            return QwenImagePipeline(**common)
        if kind == "inpaint":
            return QwenImageInpaintPipeline(**common)
        if kind == "edit":
            return QwenImageEditPlusPipeline(**common, processor=self.processor)
        raise QwenImageInputError(f"unknown pipeline kind {kind!r}; use 't2i', 'edit' or 'inpaint'.")

    def inference_sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """The sigmas the pipeline walks through for a ``height`` x ``width`` image, terminal 0 appended."""
        return inference_sigmas(self.scheduler, num_inference_steps, latent_ops.image_seq_len(height, width))

    # ------------------------------------------------------------------ building blocks
    def encode_prompt(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, L, 3584) and a 0/1 mask (B, L) with Qwen-Image's T2I template; cached per prompt
        (prompts precomputed with ``prompt_encoder.precompute`` still encode after the text encoder is released)."""
        return self.prompt_encoder.encode(prompts, device=self.device, dtype=self.dtype)

    def reference_size(self, image: Image.Image, area: int | None = None) -> tuple[int, int]:
        """(height, width) an edit's reference image is encoded at by the VAE (``area``: None = the model's)."""
        return self.edit_encoder.reference_size(image, area)

    def precompute_conditioning(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None,
                                reference_area: int | None = None) -> int:
        """Encode every row (a prompt, with its reference images for an edit model) once and keep it on CPU, so
        :meth:`conditioning` still serves these rows after the text encoder is released. Returns distinct rows.
        (``reference_area`` only sizes the VAE side here, which is not cached: accepted for the 2.1 bundle's
        signature, whose text encoder reads the images at that size.)"""
        if images is None:
            return self.prompt_encoder.precompute(prompts, progress=True)
        return self.edit_encoder.precompute(prompts, images)

    def conditioning(self, prompts: str | list[str], images=None, references: bool = True,
                     reference_area: int | None = None) -> Conditioning:
        """What conditions the transformer: the prompts alone (text-to-image), or with ``images`` (edit models: 1-3
        reference images shared by every prompt, or one list per prompt) the edit-template embeddings that read the
        images plus, unless ``references=False`` (a CFG negative: it shares the positive's), the references' VAE
        tokens at ``reference_area`` px (None: the model's, as at inference)."""
        if images is None:
            return Conditioning.from_padded(*self.encode_prompt(prompts))
        if not references:
            return Conditioning.from_padded(*self.edit_encoder.encode_prompts(prompts, images, self.device, self.dtype))
        return self.edit_encoder.conditioning(prompts, images, device=self.device, dtype=self.dtype, area=reference_area)

    def encode_images(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        """PIL images -> normalised VAE latents (B, 16, 1, H/8, W/8)."""
        self._require("vae")
        latent_ops.check_size(height, width)
        return latent_ops.encode(self.vae, latent_ops.images_to_tensor(list(images), height, width))

    def decode_latents(self, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> list[Image.Image]:
        """Normalised latents, either (B, 16, 1, h, w) or packed (B, L, 64) with height/width given -> PIL images."""
        self._require("vae")
        if latents.dim() == 3:
            if height is None or width is None:
                raise QwenImageInputError("packed latents need height and width to unpack.")
            latents = latent_ops.unpack(latents, height, width)
        return latent_ops.tensor_to_images(latent_ops.decode(self.vae, latents))

    def initial_noise(self, batch: int, height: int, width: int, seed: int | Sequence[int] | None = 0) -> torch.Tensor:
        """Packed Gaussian noise (B, L, 64) drawn like the pipeline's prepare_latents (one generator per sample)."""
        seeds = resolve_seeds(batch, seed)
        c = self.transformer.config.in_channels // 4
        h, w = height // latent_ops.VAE_SCALE_FACTOR, width // latent_ops.VAE_SCALE_FACTOR
        noise = []
        for s in seeds:
            g = torch.Generator("cpu").manual_seed(s)
            noise.append(torch.randn((1, 1, c, h, w), generator=g))
        noise = torch.cat(noise).to(self.device, self.dtype)
        return latent_ops.pack(noise.permute(0, 2, 1, 3, 4))

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        prompts: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        true_cfg_scale: float = 4.0,
        negative_prompt: str | None = " ",
        seed: int | Sequence[int] | None = 0,
        latents: torch.Tensor | None = None,
        noise_level: float = 0.0,
        sde_window: tuple[int, int] | None = None,
        record: bool = False,
        progress: bool = False,
        attention_kwargs: dict | None = None,
        images=None,
    ) -> SampleOutput:
        """Run the sampler and return packed latents (plus trajectory and log-probs when ``record``/SDE).

        ``images`` (edit models): 1-3 reference images shared by every prompt, or one list per prompt; the output
        size then defaults to the last reference's aspect ratio at the default area (as EditPlus)."""
        prompts = validate_prompts(prompts)
        if images is not None and (height is None or width is None):
            default_h, default_w = self.edit_encoder.default_target_size(normalize_references(images, len(prompts))[0])
            height, width = height or default_h, width or default_w
        height = height or self.default_size
        width = width or self.default_size
        latent_ops.check_size(height, width)
        cond = self.conditioning(prompts, images)
        negative = None
        if negative_prompt is not None and true_cfg_scale > 1:
            negative = self.conditioning([negative_prompt] * len(prompts), images, references=False)
        seeds = resolve_seeds(len(prompts), seed)  # one per image: initial noise and SDE noise both follow it
        if latents is None:
            latents = self.initial_noise(len(prompts), height, width, seeds)
        seq_len = latent_ops.image_seq_len(height, width)
        if latents.shape[1] != seq_len:
            raise QwenImageInputError(f"latents have {latents.shape[1]} tokens; {height}x{width} px needs {seq_len}.")
        sigmas = inference_sigmas(self.scheduler, num_inference_steps, seq_len)
        generator = sde_noise_generators(seeds) if noise_level > 0 else None
        return sample(
            self.transformer, latents, sigmas, cond, latent_ops.img_shapes(len(prompts), height, width),
            negative=negative, true_cfg_scale=true_cfg_scale, noise_level=noise_level, sde_window=sde_window,
            generator=generator, record=record, attention_kwargs=attention_kwargs, progress=progress,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        true_cfg_scale: float = 4.0,
        negative_prompt: str | None = " ",
        seed: int | Sequence[int] | None = 0,
        num_images_per_prompt: int = 1,
        noise_level: float = 0.0,
        progress: bool = True,
    ) -> list[Image.Image]:
        """Text-to-image. Returns ``len(prompts) * num_images_per_prompt`` PIL images (seed, seed+1, ...)."""
        prompts = [p for p in validate_prompts(prompts) for _ in range(num_images_per_prompt)]
        height = height or self.default_size
        width = width or self.default_size
        out = self.sample(prompts, height, width, num_inference_steps, true_cfg_scale, negative_prompt, seed,
                          noise_level=noise_level, progress=progress)
        return self.decode_latents(out.latents, height, width)

    def edit(
        self,
        images: Image.Image | Sequence[Image.Image],
        prompt: str,
        num_inference_steps: int = 40,
        true_cfg_scale: float = 4.0,
        negative_prompt: str = " ",
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
    ) -> Image.Image:
        """Edit-2509/2511 style editing from 1-3 reference images.

        Runs our sampler, which equals ``QwenImageEditPlusPipeline`` (tests/test_edit_model.py checks it to 1e-5),
        so what edit training optimises is exactly what this samples; ``pipeline("edit")`` is the diffusers one."""
        references = normalize_references(images, 1)[0]
        validate_prompts([prompt], allow_empty_string=False)
        self._require("processor")
        default_h, default_w = self.edit_encoder.default_target_size(references)
        height, width = height or default_h, width or default_w
        out = self.sample([prompt], height, width, num_inference_steps, true_cfg_scale, negative_prompt, seed,
                          images=[references])
        return self.decode_latents(out.latents, height, width)[0]

    def inpaint(
        self,
        image: Image.Image,
        mask: Image.Image,
        prompt: str,
        strength: float = 0.9,
        num_inference_steps: int = 50,
        true_cfg_scale: float = 4.0,
        negative_prompt: str = " ",
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
    ) -> Image.Image:
        """Repaint the white area of ``mask`` (QwenImageInpaintPipeline)."""
        height = height or (image.height // 16 * 16)
        width = width or (image.width // 16 * 16)
        latent_ops.check_size(height, width)
        if mask.size != image.size:
            raise QwenImageInputError(f"mask size {mask.size} differs from image size {image.size}.")
        if not 0 < strength <= 1:
            raise QwenImageInputError(f"strength must be in (0, 1], got {strength}.")
        validate_prompts([prompt], allow_empty_string=False)
        pipe = self.pipeline("inpaint")
        pipe.set_progress_bar_config(leave=False)
        return pipe(
            prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, image=image.convert("RGB"),
            mask_image=mask.convert("L"), strength=strength, num_inference_steps=num_inference_steps,
            height=height, width=width, generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]


def is_edit_checkpoint(path: str | os.PathLike) -> bool:
    """An edit checkpoint (Edit-2509 / 2511): a ``processor/`` folder and ``QwenImageEditPlusPipeline`` in
    model_index.json. The first Qwen-Image-Edit (``QwenImageEditPipeline``: one image, no "Picture 1:" prefix, the
    vision side at 1024² px) encodes differently and is not trained here: a warning says so."""
    path = Path(path)
    index = path / "model_index.json"
    if not (path / "processor").is_dir() or not index.is_file():
        return False
    name = str(json.loads(index.read_text()).get("_class_name", ""))
    if "Edit" in name and name != QwenImageEditPlusPipeline.__name__:
        logger.warning("%s is a %s checkpoint: only QwenImageEditPlusPipeline ones (Edit-2509/2511) get the edit "
                       "conditioning; loading it as text-to-image.", path, name)
    return name == QwenImageEditPlusPipeline.__name__


def default_size_of(path: Path) -> int:
    """The default image side a checkpoint folder was saved with (this toolkit's marker file), else 1024."""
    marker = path / "qwen_image_align.json"
    if marker.is_file():
        return int(json.loads(marker.read_text()).get("default_size", 1024))
    return 1024
