"""Model-based rewards on CLIP-like towers: ``clip_score``, ``pickscore``, ``hpsv2``, ``aesthetic``.

Weights are loaded ONLY from a local path the user gives (``local_files_only=True``); nothing is ever
downloaded. A path in the Hugging Face layout (``config.json`` + weights + processor/tokenizer files, e.g. a
``huggingface-cli download`` snapshot) loads with ``transformers.AutoModel`` / ``AutoProcessor``, so CLIP and
SigLIP checkpoints both work. Loaded models are cached per process (path, device, dtype).

transformers 5 note: ``get_image_features`` returns an output object, so the scores read
``model(**inputs).image_embeds`` / ``.text_embeds`` (already L2-normalised), or ``.pooler_output``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from .images import to_pil
from .registry import register_reward

__all__ = ["load_clip", "ClipScore", "PickScore", "HPSv2", "AestheticScore", "load_linear_head"]

log = logging.getLogger(__name__)

_MODEL_CACHE: dict[tuple, tuple[Any, Any]] = {}
_CACHE_LOCK = threading.Lock()


def _check_path(path: str | os.PathLike | None, what: str, hint: str) -> Path:
    if path is None or str(path) == "":
        raise ValueError(f"{what}: pass model_path=<local directory> ({hint}); weights are never downloaded")
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{what}: path '{p}' does not exist (expected a local copy of {hint}; "
                                f"weights are never downloaded)")
    return p


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    return getattr(torch, str(dtype).replace("torch.", ""))


def load_clip(model_path, processor_path=None, *, device: str = "cpu", dtype=None, what: str = "clip",
              hint: str = "a CLIP checkpoint"):
    """Load (model, processor) from local directories, cached per process. Model is in eval mode."""
    mp = _check_path(model_path, what, hint)
    pp = _check_path(processor_path, what, hint) if processor_path is not None else mp
    dt = _torch_dtype(dtype)
    key = (str(mp.resolve()), str(pp.resolve()), str(device), str(dt))
    with _CACHE_LOCK:
        if key not in _MODEL_CACHE:
            from transformers import AutoModel, AutoProcessor

            model = AutoModel.from_pretrained(str(mp), local_files_only=True, dtype=dt)
            model.to(device).eval().requires_grad_(False)
            processor = AutoProcessor.from_pretrained(str(pp), local_files_only=True)
            _MODEL_CACHE[key] = (model, processor)
        return _MODEL_CACHE[key]


def _max_text_len(model, requested: int) -> int:
    cfg = getattr(getattr(model, "config", None), "text_config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or requested
    return min(int(requested), int(limit))


class _ClipReward:
    """Shared batching: embeds prompts and images with a CLIP-like model and scores matched pairs."""

    what = "clip"
    hint = "a CLIP checkpoint"

    def __init__(self, model_path=None, processor_path=None, *, device: str = "cpu", dtype=None,
                 batch_size: int = 16, max_length: int = 77):
        self.model, self.processor = load_clip(model_path, processor_path, device=device, dtype=dtype,
                                               what=self.what, hint=self.hint)
        self.device = device
        self.batch_size = int(batch_size)
        self.max_length = _max_text_len(self.model, max_length)

    def _inputs(self, prompts, images):
        inputs = self.processor(text=list(prompts), images=images, return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_length)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    def pair_scores(self, prompts, images):
        """(cosine similarities, logit scale) for matched (prompt_i, image_i) pairs as float32 tensors."""
        import torch

        cos, scale = [], None
        with torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                p = [x or "" for x in prompts[i:i + self.batch_size]]
                ims = [to_pil(x) for x in images[i:i + self.batch_size]]
                out = self.model(**self._inputs(p, ims))
                img = out.image_embeds.float()
                txt = out.text_embeds.float()
                img = img / img.norm(dim=-1, keepdim=True)
                txt = txt / txt.norm(dim=-1, keepdim=True)
                cos.append((img * txt).sum(-1).cpu())
                if scale is None:
                    ls = getattr(self.model, "logit_scale", None)
                    scale = float(ls.float().exp()) if ls is not None else 100.0
        return (torch.cat(cos) if cos else torch.zeros(0)), scale

    def _check(self, prompts, images):
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")


@register_reward("clip_score")
class ClipScore(_ClipReward):
    """CLIP prompt-image cosine similarity times ``scale``.

    Range [-scale, scale] (default scale 1.0: [-1, 1]; real CLIP ViT-L/14 gives about 0.15-0.40 for
    matching pairs). ``scale=2.5`` with ``clamp_min=0`` is Hessel et al.'s CLIPScore; ``scale=100`` with
    ``clamp_min=0`` is torchmetrics'. Args: ``model_path`` (local dir, e.g. openai/clip-vit-large-patch14),
    ``processor_path`` (default = model_path), ``device``, ``dtype``, ``batch_size``.
    """

    what = "clip_score"
    hint = "a CLIP checkpoint such as openai/clip-vit-large-patch14"

    def __init__(self, model_path=None, processor_path=None, *, scale: float = 1.0,
                 clamp_min: float | None = None, **kw):
        super().__init__(model_path, processor_path, **kw)
        self.scale, self.clamp_min = float(scale), clamp_min

    def __call__(self, prompts: list[str], images: list[Image.Image], **columns) -> list[float | None]:
        self._check(prompts, images)
        cos, _ = self.pair_scores(prompts, images)
        if self.clamp_min is not None:
            cos = cos.clamp(min=self.clamp_min)
        return [float(self.scale * c) for c in cos]


@register_reward("pickscore")
class PickScore(_ClipReward):
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cos(text, image) / 26`` as in flow_grpo.

    Range about [-3.85, 3.85] in theory (logit scale <= 100); real PickScore_v1 gives about 0.75-0.9.
    ``model_path`` = local yuvalkirstain/PickScore_v1, ``processor_path`` = local
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K (defaults to model_path). ``divisor`` (26) is configurable.
    English prompts only in practice (77-token CLIP BPE).
    """

    what = "pickscore"
    hint = "yuvalkirstain/PickScore_v1 (+ processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"

    def __init__(self, model_path=None, processor_path=None, *, divisor: float = 26.0, **kw):
        super().__init__(model_path, processor_path, **kw)
        self.divisor = float(divisor)

    def __call__(self, prompts: list[str], images: list[Image.Image], **columns) -> list[float | None]:
        self._check(prompts, images)
        cos, scale = self.pair_scores(prompts, images)
        return [float(scale * c / self.divisor) for c in cos]


@register_reward("hpsv2")
class HPSv2(_ClipReward):
    """HPSv2 / HPSv2.1 human-preference score: cosine of the prompt and image embeddings (unscaled).

    Range [-1, 1]; HPSv2.1 gives about 0.2-0.35 on real images. Needs a checkpoint in the transformers
    CLIP layout (the original ``HPS_v2.1_compressed.pt`` is an open_clip ViT-H-14 state dict and must be
    converted first); ``processor_path`` defaults to ``model_path``.
    """

    what = "hpsv2"
    hint = "an HPSv2.1 checkpoint converted to the transformers CLIP layout"

    def __call__(self, prompts: list[str], images: list[Image.Image], **columns) -> list[float | None]:
        self._check(prompts, images)
        cos, _ = self.pair_scores(prompts, images)
        return [float(c) for c in cos]


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def load_linear_head(path, *, activation: str | None = None):
    """Build a ``torch.nn.Sequential`` of Linear layers from a state-dict file (.safetensors / .pth / .pt / .bin).

    Every 2-D ``*weight`` tensor is a Linear layer (with its ``*bias`` when present), applied in natural key
    order (``layers.0``, ``layers.2``, ... ``layers.10``); Dropout entries carry no keys and vanish. This
    loads the LAION improved-aesthetic-predictor ``sac+logos+ava1-l14-linearMSE.pth`` (768-1024-128-64-16-1,
    no activations) as well as a single linear probe. ``activation`` ("relu" / "gelu") goes between layers.
    """
    import torch

    p = _check_path(path, "aesthetic", "an aesthetic head file such as sac+logos+ava1-l14-linearMSE.pth")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    wkeys = sorted((k for k, v in sd.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2),
                   key=_natural_key)
    if not wkeys:
        raise ValueError(f"aesthetic: no 2-D '*weight' tensors in {p}")
    acts = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, None: None}
    if activation not in acts:
        raise ValueError(f"activation must be one of {list(acts)}")
    layers: list[torch.nn.Module] = []
    prev_out = None
    for i, k in enumerate(wkeys):
        w = sd[k]
        b = sd.get(k[: -len("weight")] + "bias")
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w.float())
            if b is not None:
                lin.bias.copy_(b.float())
        if prev_out is not None and prev_out != w.shape[1]:
            raise ValueError(f"aesthetic: layer {k} expects {w.shape[1]} inputs, previous layer gives {prev_out}")
        prev_out = w.shape[0]
        layers.append(lin)
        if acts[activation] is not None and i < len(wkeys) - 1:
            layers.append(acts[activation]())
    if prev_out != 1:
        raise ValueError(f"aesthetic: the head must output 1 value, got {prev_out}")
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


@register_reward("aesthetic")
class AestheticScore(_ClipReward):
    """Aesthetic score: an MLP / linear head on the L2-normalised CLIP image embedding (prompt ignored).

    Range: the head's raw output, unbounded; the LAION improved-aesthetic-predictor (on
    openai/clip-vit-large-patch14) gives about 1-10, mostly 4-7. Args: ``model_path`` (CLIP dir),
    ``head_path`` (state-dict file, see :func:`load_linear_head`), ``normalize_embeds`` (default True, as LAION).
    """

    what = "aesthetic"
    hint = "openai/clip-vit-large-patch14"

    def __init__(self, model_path=None, head_path=None, processor_path=None, *, activation: str | None = None,
                 normalize_embeds: bool = True, **kw):
        if head_path is None:
            raise ValueError("aesthetic: pass head_path=<local head file> (e.g. sac+logos+ava1-l14-linearMSE.pth)")
        super().__init__(model_path, processor_path, **kw)
        self.head = load_linear_head(head_path, activation=activation).to(self.device)
        self.normalize_embeds = normalize_embeds

    def image_embeds(self, images) -> "Any":
        """Projected image embeddings (float32, L2-normalised if ``normalize_embeds``)."""
        import torch

        embs = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                ims = [to_pil(x) for x in images[i:i + self.batch_size]]
                px = self.processor(images=ims, return_tensors="pt")["pixel_values"]
                px = px.to(self.device, next(self.model.parameters()).dtype)
                feats = self.model.get_image_features(pixel_values=px)
                if not torch.is_tensor(feats):  # transformers 5: an output object
                    feats = feats.pooler_output
                feats = feats.float()
                if self.normalize_embeds:
                    feats = feats / feats.norm(dim=-1, keepdim=True)
                embs.append(feats)
        return torch.cat(embs) if embs else torch.zeros(0)

    def __call__(self, prompts: list[str], images: list[Image.Image], **columns) -> list[float | None]:
        import torch

        self._check(prompts, images)
        if not len(images):
            return []
        with torch.inference_mode():
            s = self.head(self.image_embeds(images)).squeeze(-1).cpu()
        return [float(x) for x in s]
