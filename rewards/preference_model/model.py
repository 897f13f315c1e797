"""The Bradley-Terry head, its training on cached features, and the model (frozen backbone + head) with its
save / load and the ``preference_model`` reward."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from qwen_image.errors import UserError

from ..images import to_pil
from ..registry import register_reward

__all__ = ["build_head", "fit_head", "FittedHead", "PreferenceModel", "PreferenceModelReward", "CONFIG_NAME",
           "HEAD_NAME"]

CONFIG_NAME = "preference_model.json"
HEAD_NAME = "head.safetensors"
_FORMAT = "qwen-image-align/preference-model-v1"


def build_head(in_dim: int, hidden: int = 0):
    """``Linear(in_dim, 1)`` or ``Linear-ReLU-Linear`` with ``hidden`` units; seeded by the caller."""
    import torch

    if hidden <= 0:
        return torch.nn.Sequential(torch.nn.Linear(in_dim, 1))
    return torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))


@dataclass
class FittedHead:
    """A trained head and the feature standardisation it was trained with (scores = head((x - mean) / std))."""

    head: Any
    mean: Any
    std: Any

    def scores(self, feats) -> Any:
        import torch

        with torch.no_grad():
            return self.head((feats.float() - self.mean) / self.std).squeeze(-1)


def fit_head(feats_chosen, feats_rejected, targets=None, *, hidden: int = 0, steps: int = 100,
             weight_decay: float = 1e-3, seed: int = 0) -> FittedHead:
    """Train a Bradley-Terry head on cached features: full-batch L-BFGS (strong Wolfe line search) on
    ``BCE(sigmoid(r(chosen) - r(rejected)), target) + weight_decay * sum(weight ** 2)``. The problem is small and
    (for the linear head) convex, so a few dozen full-batch steps converge, with no learning rate to tune.
    Deterministic for a seed. ``targets`` default to 1."""
    import torch

    fc, fr = feats_chosen.float(), feats_rejected.float()
    if fc.shape != fr.shape or fc.ndim != 2 or not len(fc):
        raise ValueError(f"fit_head needs two [n, d] feature tensors of one shape, got {tuple(fc.shape)} and "
                         f"{tuple(fr.shape)}")
    t = torch.ones(len(fc)) if targets is None else torch.as_tensor(targets, dtype=torch.float32)
    both = torch.cat([fc, fr])
    mean, std = both.mean(0), both.std(0, unbiased=False).clamp_min(1e-6)
    xc, xr = (fc - mean) / std, (fr - mean) / std
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = build_head(fc.shape[1], hidden)
    weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
    opt = torch.optim.LBFGS(head.parameters(), max_iter=int(steps), line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        margin = head(xc).squeeze(-1) - head(xr).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(margin, t)
        loss = loss + weight_decay * sum((w ** 2).sum() for w in weights)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head.eval().requires_grad_(False)
    return FittedHead(head, mean, std)


# ----------------------------------------------------------------------------------------------------------- model

def _embeds(out) -> Any:
    import torch

    return out if torch.is_tensor(out) else out.pooler_output   # transformers 5: an output object


class PreferenceModel:
    """A frozen CLIP-family backbone plus a Bradley-Terry head: ``scores(prompts, images)`` are rewards (higher =
    preferred; the difference of two scores is the log-odds that the raters prefer the first image)."""

    def __init__(self, backbone_path, head=None, *, processor_path=None, use_text: bool = True,
                 device: str = "cpu", dtype=None, batch_size: int = 16, max_length: int = 77):
        from ..models import _max_text_len, load_clip

        try:
            self.model, self.processor = load_clip(backbone_path, processor_path, device=device, dtype=dtype,
                                                   what="preference_model", hint="the CLIP-family backbone")
        except (FileNotFoundError, ValueError) as err:
            raise UserError(str(err)) from None
        except OSError as err:   # a folder without a model in it
            raise UserError(f"preference_model: cannot load a backbone from {backbone_path}: "
                            f"{str(err).splitlines()[0]}") from None
        self.backbone_path = str(backbone_path)
        self.processor_path = str(processor_path) if processor_path else None
        self.use_text, self.device, self.batch_size = bool(use_text), device, int(batch_size)
        self.max_length = _max_text_len(self.model, max_length)
        self.fitted: FittedHead | None = head
        self.info: dict = {}

    # -- features
    def image_embeds(self, images: Sequence[Any]):
        import torch

        out = []
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                ims = [to_pil(x) for x in images[i:i + self.batch_size]]
                px = self.processor(images=ims, return_tensors="pt")["pixel_values"].to(self.device, dtype)
                out.append(_embeds(self.model.get_image_features(pixel_values=px)).float().cpu())
        emb = torch.cat(out) if out else torch.zeros(0)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def text_embeds(self, prompts: Sequence[str]):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                tok = self.processor(text=[p or "" for p in prompts[i:i + self.batch_size]], return_tensors="pt",
                                     padding=True, truncation=True, max_length=self.max_length)
                tok = {k: v.to(self.device) for k, v in tok.items()}
                out.append(_embeds(self.model.get_text_features(**tok)).float().cpu())
        emb = torch.cat(out) if out else torch.zeros(0)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def features(self, prompts: Sequence[str], images: Sequence[Any]):
        """One feature row per (prompt, image); each distinct prompt and image path is embedded once."""
        import torch

        # A pair set shows each image in several pairs: embed a path once (in-memory images are not deduplicated).
        keys = [str(im) if isinstance(im, (str, os.PathLike)) else f"#{i}" for i, im in enumerate(images)]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        slot = {k: j for j, k in enumerate(first)}
        img = self.image_embeds([images[i] for i in first.values()])[[slot[k] for k in keys]]
        if not self.use_text:
            return img
        texts = {p: j for j, p in enumerate(dict.fromkeys(prompts))}
        txt = self.text_embeds(list(texts))[[texts[p] for p in prompts]]
        return torch.cat([img, img * txt], dim=-1)

    # -- scoring
    def scores_from_features(self, feats) -> list[float]:
        if self.fitted is None:
            raise RuntimeError("the preference model has no trained head yet")
        return [float(x) for x in self.fitted.scores(feats)]

    def scores(self, prompts: Sequence[str], images: Sequence[Any]) -> list[float]:
        if len(prompts) != len(images):
            raise UserError(f"preference_model: got {len(images)} images for {len(prompts)} prompts")
        if not len(images):
            return []
        return self.scores_from_features(self.features(list(prompts), list(images)))

    def prob_first_preferred(self, prompts: Sequence[str], images_a: Sequence[Any], images_b: Sequence[Any]
                             ) -> list[float]:
        """P(the raters prefer image a over image b) = sigmoid(r(a) - r(b)), per pair."""
        sa, sb = self.scores(prompts, images_a), self.scores(prompts, images_b)
        return [0.5 + 0.5 * math.tanh((a - b) / 2) for a, b in zip(sa, sb)]   # sigmoid, no overflow

    # -- persistence
    def save(self, output_dir: str | os.PathLike, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        if self.fitted is None:
            raise RuntimeError("nothing to save: the head is not trained")
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"head.{k}": v.contiguous() for k, v in self.fitted.head.state_dict().items()}
        tensors["input_mean"], tensors["input_std"] = self.fitted.mean.contiguous(), self.fitted.std.contiguous()
        save_file(tensors, str(out / HEAD_NAME))
        first = self.fitted.head[0]
        hidden = first.out_features if len(self.fitted.head) > 1 else 0
        cfg = {"format": _FORMAT, "backbone_path": str(Path(self.backbone_path).expanduser().resolve()),
               "processor_path": self.processor_path, "use_text": self.use_text,
               "in_dim": first.in_features, "hidden": hidden, **(extra or {})}
        (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone_path=None, device: str = "cpu", dtype=None,
             batch_size: int = 16) -> "PreferenceModel":
        """Load a saved model; ``backbone_path`` overrides the saved one (the backbone moved)."""
        from safetensors.torch import load_file

        p = Path(os.path.expanduser(str(path or "")))
        if not str(path or "") or not (p / CONFIG_NAME).is_file() or not (p / HEAD_NAME).is_file():
            raise UserError(f"preference_model: {p} is not a trained preference model (it needs {CONFIG_NAME} and "
                            f"{HEAD_NAME}; train one with `python -m rewards.preference_model train`)")
        try:
            cfg = json.loads((p / CONFIG_NAME).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"preference_model: {p / CONFIG_NAME} is not valid JSON ({err.msg})") from None
        if cfg.get("format") != _FORMAT:
            raise UserError(f"preference_model: {p / CONFIG_NAME} is not a {_FORMAT} config")
        model = cls(backbone_path or cfg["backbone_path"], processor_path=cfg.get("processor_path"),
                    use_text=cfg["use_text"], device=device, dtype=dtype, batch_size=batch_size)
        sd = load_file(str(p / HEAD_NAME))
        head = build_head(int(cfg["in_dim"]), int(cfg["hidden"]))
        head.load_state_dict({k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")})
        head.eval().requires_grad_(False)
        model.fitted = FittedHead(head, sd["input_mean"], sd["input_std"])
        model.info = cfg
        return model


@register_reward("preference_model")
class PreferenceModelReward:
    """The raters' preference as a reward: the Bradley-Terry score of a model trained with
    ``python -m rewards.preference_model train``. Range: unbounded log-odds units (a difference of 1 means the
    raters would prefer the first image with probability 0.73). Args: ``path`` (the training output folder),
    ``backbone_path`` (override the saved backbone location), ``device``, ``dtype``, ``batch_size``."""

    def __init__(self, path=None, *, backbone_path=None, device: str = "cpu", dtype=None, batch_size: int = 16):
        self.model = PreferenceModel.load(path, backbone_path=backbone_path, device=device, dtype=dtype,
                                          batch_size=batch_size)

    def __call__(self, prompts: list[str], images: list[Image.Image], **columns: Any) -> list[float | None]:
        return list(self.model.scores(prompts, images))


