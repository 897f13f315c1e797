"""Generate the demo prompts with a model (+ adapter) on held-out seeds and score them with the OCR reward; save
sample grids. Two prompt sets: the training prompts (what SFT, the pairs and the rollouts used) and held-out
prompts (the same slogans in caption templates no stage trained on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from rewards.render import load_font


def image_grid(images: Sequence[Image.Image], rows: int, cols: int, labels: Sequence[str] = (), scale: int = 2) -> Image.Image:
    """Images in a rows x cols grid (row-major), upscaled ``scale`` x (nearest: keep the pixels honest), with a
    label strip above each row."""
    w, h = images[0].size
    w, h = w * scale, h * scale
    strip = 20 if labels else 0
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    font = load_font(14)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img.resize((w, h), Image.NEAREST), (c * w, r * (h + strip) + strip))
    for r, label in enumerate(labels[:rows]):
        draw.text((4, r * (h + strip) + 2), label, fill="black", font=font)
    return grid


def eval_seeds(eval_cfg: dict[str, Any]) -> list[int]:
    """The evaluation seeds: a list as given, or ``seeds: N`` -> ``seed_offset .. seed_offset + N - 1``.

    The default offset (1000) keeps them apart from the seeds the pairs (0, 1, ...) were generated with; the
    rollouts draw their noise from the trainer's generator, not from these integers."""
    seeds = eval_cfg.get("seeds", 16)
    if isinstance(seeds, int):
        offset = int(eval_cfg.get("seed_offset", 1000))
        return list(range(offset, offset + seeds))
    return [int(s) for s in seeds]


def _score_set(model, rows: Sequence[dict], seeds: list[int], eval_cfg: dict[str, Any], size: int, out_dir: Path,
               tag: str, grid_seeds: int) -> dict:
    from rewards import get_reward

    ocr = get_reward("ocr", **dict(eval_cfg.get("ocr") or {}))
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    per_prompt, shown = [], []
    for pi, row in enumerate(rows):
        # One batch per prompt, one seed per image: the same initial noise for every stage, so gains are paired.
        images = model.generate([row["prompt"]] * len(seeds), height=size, width=size,
                                num_inference_steps=int(eval_cfg.get("num_inference_steps", 16)),
                                true_cfg_scale=float(eval_cfg.get("true_cfg_scale", 1.0)), seed=seeds, progress=False)
        scores = [float(x or 0.0) for x in ocr([row["prompt"]] * len(images), images, text=[row["text"]] * len(images))]
        for s, img in zip(seeds, images):
            img.save(out_dir / "images" / f"{tag}_p{pi}_s{s}.png")
        shown += images[:grid_seeds]
        per_prompt.append({"prompt": row["prompt"], "text": row["text"], "ocr": scores,
                           "ocr_mean": sum(scores) / len(scores)})
    labels = [f"{r['text']}  OCR {r['ocr_mean']:.2f}  ({r['prompt'][:40]})" for r in per_prompt]
    grid = out_dir / f"samples_{tag}.png"
    image_grid(shown, len(rows), min(grid_seeds, len(seeds)), labels).save(grid)
    return {"ocr_mean": sum(r["ocr_mean"] for r in per_prompt) / len(per_prompt), "per_prompt": per_prompt,
            "grid": str(grid)}


def evaluate_samples(model_dir: Path, adapter: Path | None, prompts: Sequence[dict], out_dir: Path,
                     eval_cfg: dict[str, Any], size: int, heldout_prompts: Sequence[dict] = ()) -> dict:
    """OCR reward per prompt and seed for the model at ``model_dir`` with ``adapter``, on ``prompts`` and on
    ``heldout_prompts`` (under ``"heldout"``), all with the held-out :func:`eval_seeds`.

    Writes ``samples_train.png`` / ``samples_heldout.png`` (one row per prompt, the first ``grid_seeds`` seeds),
    the images and ``scores.json`` (``per_prompt[i]["ocr"][j]`` is prompt i with seed j).
    """
    from qwen_image import QwenImage

    model = QwenImage.from_pretrained(model_dir, torch_dtype="float32")
    if adapter is not None:
        model.load_lora(adapter)
    seeds = eval_seeds(eval_cfg)
    grid_seeds = int(eval_cfg.get("grid_seeds", 8))
    result = {**_score_set(model, prompts, seeds, eval_cfg, size, out_dir, "train", grid_seeds),
              "adapter": str(adapter) if adapter else None, "seeds": seeds}
    if heldout_prompts:
        result["heldout"] = _score_set(model, heldout_prompts, seeds, eval_cfg, size, out_dir, "heldout", grid_seeds)
    (out_dir / "scores.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result
