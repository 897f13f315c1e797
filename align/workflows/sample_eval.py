"""Generate the demo prompts with a model (+ adapter) and score them with the OCR reward; save a sample grid."""

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


def evaluate_samples(model_dir: Path, adapter: Path | None, prompts: Sequence[dict], out_dir: Path,
                     eval_cfg: dict[str, Any], size: int) -> dict:
    """OCR reward per prompt (mean over ``eval_cfg['seeds']``) for the model at ``model_dir`` with ``adapter``.

    Writes ``samples.png`` (one row per prompt, one column per seed), the images and ``scores.json``.
    """
    from qwen_image import QwenImage
    from rewards import get_reward

    model = QwenImage.from_pretrained(model_dir, torch_dtype="float32")
    if adapter is not None:
        model.load_lora(adapter)
    seeds = [int(s) for s in eval_cfg.get("seeds", [0, 1])]
    ocr = get_reward("ocr")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    per_prompt, images_all = [], []
    for pi, row in enumerate(prompts):
        images = [model.generate([row["prompt"]], height=size, width=size,
                                 num_inference_steps=int(eval_cfg.get("num_inference_steps", 16)),
                                 true_cfg_scale=float(eval_cfg.get("true_cfg_scale", 1.0)), seed=s, progress=False)[0]
                  for s in seeds]
        scores = [float(x or 0.0) for x in ocr([row["prompt"]] * len(images), images, text=[row["text"]] * len(images))]
        for s, img in zip(seeds, images):
            img.save(out_dir / "images" / f"p{pi}_s{s}.png")
        images_all += images
        per_prompt.append({"prompt": row["prompt"], "text": row["text"], "ocr": scores,
                           "ocr_mean": sum(scores) / len(scores)})
    labels = [f"{r['text']}  OCR {r['ocr_mean']:.2f}" for r in per_prompt]
    image_grid(images_all, len(prompts), len(seeds), labels).save(out_dir / "samples.png")
    mean = sum(r["ocr_mean"] for r in per_prompt) / len(per_prompt)
    result = {"ocr_mean": mean, "per_prompt": per_prompt, "grid": str(out_dir / "samples.png"),
              "adapter": str(adapter) if adapter else None, "seeds": seeds}
    (out_dir / "scores.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result
