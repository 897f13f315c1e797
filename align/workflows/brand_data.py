"""The demo's brand dataset: slogans rendered with the bundled CJK font, captions and three simulated ratings.

Most renders are on-brand (dark text, clean background) and get high ratings; a few low-contrast renders get low
ones, so the SFT stage's rater filter (>= 3 ratings, mean >= 4.5) has something to drop, as with real raters.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image

from rewards.render import render_text

from ..datatools.imagefolder import write_imagefolder
from ..datatools.synthesis import detect_language


def caption(template: str, slogan: str) -> str:
    return template.format(slogan=slogan)


def render_slogan(slogan: str, size: int, font_size: int, background, color) -> Image.Image:
    # Small margin and big text: at 64 px the tiny VAE only keeps glyphs that span several 8 px latent cells.
    return render_text(slogan, size=(size, size), font_size=font_size, background=tuple(background),
                       color=tuple(color), margin=2)


def brand_rows(cfg: dict[str, Any]) -> list[dict]:
    """One row per render: image, prompt, the slogan as ``text`` (the OCR target), metadata, three ratings."""
    rng = random.Random(int(cfg.get("seed", 0)))
    size, font_size = int(cfg["size"]), int(cfg.get("font_size", 30))
    rows = []
    for slogan in cfg["slogans"]:
        prompt = caption(cfg["caption"], slogan)
        meta = {"prompt": prompt, "text": slogan, "language": detect_language(slogan), "font_style": "sans",
                "text_layout": "horizontal", "background_type": "solid"}
        for bg in cfg.get("backgrounds", [[255, 255, 255]]):
            for color in cfg.get("text_colors", [[20, 20, 20]]):
                # Three raters who like the on-brand renders: ratings 4-5, mean >= 4.5 with two 5s.
                ratings = sorted([5, 5, rng.choice([4, 5])], key=lambda _: rng.random())
                rows.append({**meta, "image": render_slogan(slogan, size, font_size, bg, color), "ratings": ratings})
        for _ in range(int(cfg.get("rejects_per_slogan", 1))):
            # Off-brand: washed-out text the raters score low; the rater filter drops these rows.
            bg = cfg.get("backgrounds", [[255, 255, 255]])[0]
            faded = [min(255, int(c) - 25) for c in bg]
            ratings = [rng.choice([1, 2, 3]) for _ in range(3)]
            rows.append({**meta, "image": render_slogan(slogan, size, font_size, bg, faded), "ratings": ratings})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def heldout_prompts(cfg: dict[str, Any]) -> list[dict]:
    """The slogans in the ``heldout_captions`` templates: prompts no stage trains on (only evaluation sees them)."""
    return [{"prompt": caption(t, s), "text": s} for t in cfg.get("heldout_captions") or [] for s in cfg["slogans"]]


def write_brand_dataset(cfg: dict[str, Any], out_dir: Path) -> dict:
    """Write the imagefolder (``metadata.jsonl``), ``prompts.jsonl`` (prompt + text: the training prompts, for the
    pairs, the rollouts and evaluation) and ``heldout_prompts.jsonl`` (evaluation only)."""
    rows = brand_rows(cfg)
    folder = write_imagefolder(rows, out_dir / "brand", overwrite=True)
    _write_jsonl(out_dir / "prompts.jsonl", [{"prompt": caption(cfg["caption"], s), "text": s} for s in cfg["slogans"]])
    held = heldout_prompts(cfg)
    _write_jsonl(out_dir / "heldout_prompts.jsonl", held)
    kept = sum(1 for r in rows if len(r["ratings"]) >= 3 and sum(r["ratings"]) / 3 >= 4.5)
    return {"images": len(rows), "kept_by_raters": kept, "folder": str(folder), "prompts": str(out_dir / "prompts.jsonl"),
            "heldout_prompts": len(held)}


def kept_images(folder: Path, min_score: float = 4.5) -> list[Image.Image]:
    """The images the rater filter keeps (what the VAE is fitted on and SFT trains on)."""
    out = []
    for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if len(rec["ratings"]) >= 3 and sum(rec["ratings"]) / len(rec["ratings"]) >= min_score:
            out.append(Image.open(folder / rec["file_name"]).convert("RGB"))
    return out
