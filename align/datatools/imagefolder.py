"""Write rows (image + metadata) as a Hugging Face imagefolder: images plus ``metadata.jsonl``.

This is the format the SFT trainer reads: one JSON object per line with ``file_name`` (relative to the folder),
``prompt``, optional ``ratings`` ([r1, r2, r3]) and any other metadata (``text``, ``language``, ``font_style``,
``text_layout``, ``background_type``, ``mode``...). Load with
``datasets.load_dataset("imagefolder", data_dir=out_dir, split="train")``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from qwen_image.errors import UserError

__all__ = ["write_imagefolder", "synthesize_imagefolder"]


def _jsonable(v: Any):
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def write_imagefolder(rows: Iterable[dict], out_dir: str | Path, image_column: str = "image",
                      ratings: Sequence[Sequence[float]] | Callable[[dict], Sequence[float]] | None = None,
                      image_format: str = "png", prefix: str = "", overwrite: bool = False) -> Path:
    """Save ``rows`` (dicts with a PIL image under ``image_column`` and metadata) as an imagefolder.

    ``ratings``: per-row lists of ratings (or a callable row -> list) written as ``ratings``; rows may also carry
    their own ``ratings``. ``image_format``: png (lossless, right for text) or jpg/webp. Refuses to write into a
    folder that already has a ``metadata.jsonl`` unless ``overwrite``. Returns the folder path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "metadata.jsonl"
    if meta_path.exists() and not overwrite:
        raise FileExistsError(f"{meta_path} exists (pass overwrite=True; on the command line --overwrite)")
    ext = {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(ext)
    if pil_format is None:
        raise UserError("image_format must be png, jpg or webp")
    n = 0
    with open(meta_path, "w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            img = row[image_column]
            if not isinstance(img, Image.Image):
                from .filtering import load_image

                img = load_image(img)
            name = f"{prefix}{i:06d}.{ext}"
            save = img.convert("RGB") if pil_format == "JPEG" else img
            save.save(out / name, format=pil_format, **({"quality": 95} if pil_format != "PNG" else {}))
            rec = {"file_name": name}
            rec.update({k: _jsonable(v) for k, v in row.items() if k not in (image_column, "file_name")})
            if ratings is not None:
                rec["ratings"] = [float(r) for r in (ratings(row) if callable(ratings) else ratings[i])]
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    if n == 0:
        raise UserError("no rows to write")
    return out


def synthesize_imagefolder(texts: Iterable[str], out_dir: str | Path, modes: Sequence[str] = ("plain", "scene", "template"),
                           size=(512, 512), seed: int = 0, per_text: int = 1, ratings=None, overwrite: bool = False,
                           **kwargs) -> Path:
    """:func:`synthesize_text_images` then :func:`write_imagefolder` in one call."""
    from .synthesis import synthesize_text_images

    rows = synthesize_text_images(texts, modes=modes, size=size, seed=seed, per_text=per_text, **kwargs)
    return write_imagefolder(rows, out_dir, ratings=ratings, overwrite=overwrite)
