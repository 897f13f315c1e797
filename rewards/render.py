"""Render text to images with a bundled CJK font (Noto Sans/Serif SC from ``pylopdf-fonts-zh-cn``).

Used by the tests of the ``ocr`` reward and by data-synthesis code::

    from rewards.render import render_text, cjk_font_path
    img = render_text("新品上市 Latte", size=(512, 512), font_size=48)
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["cjk_font_path", "load_font", "render_text"]

_FONT_FILES = {"sans": "NotoSansSC-Regular.otf", "serif": "NotoSerifSC-Regular.otf"}


def cjk_font_path(style: str = "sans") -> Path:
    """Path of the bundled Noto Sans SC (``style="sans"``) or Noto Serif SC (``"serif"``) font (OFL).

    Raises a one-line error when the ``pylopdf-fonts-zh-cn`` package is not installed.
    """
    if style not in _FONT_FILES:
        raise ValueError(f"style must be one of {sorted(_FONT_FILES)}, got {style!r}")
    try:
        root = importlib.resources.files("pylopdf_fonts_zh_cn")
    except ModuleNotFoundError as e:  # pragma: no cover - dependency is pinned
        raise RuntimeError("CJK fonts missing: pip install pylopdf-fonts-zh-cn==0.1.1") from e
    path = Path(str(root / _FONT_FILES[style]))
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"font file not found: {path}")
    return path


@functools.lru_cache(maxsize=64)
def load_font(font_size: int, font_path: str | None = None, style: str = "sans") -> ImageFont.FreeTypeFont:
    """A cached ``ImageFont.truetype`` for ``font_path`` (default: the bundled CJK font of ``style``)."""
    return ImageFont.truetype(str(font_path or cjk_font_path(style)), int(font_size))


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _wrap_line(draw, line: str, font, max_width: float) -> list[str]:
    """Greedy wrap: break at spaces when possible, otherwise between characters (CJK)."""
    if _text_width(draw, line, font) <= max_width:
        return [line]
    out, cur = [], ""
    for ch in line:
        if _text_width(draw, cur + ch, font) <= max_width or not cur:
            cur += ch
            continue
        cut = cur.rfind(" ")
        if cut > 0 and ch != " ":
            out.append(cur[:cut])
            cur = cur[cut + 1:] + ch
        else:
            out.append(cur.rstrip())
            cur = "" if ch == " " else ch
    if cur.strip():
        out.append(cur)
    return out


def render_text(
    text: str,
    size: tuple[int, int] = (512, 512),
    font_size: int = 48,
    background=(255, 255, 255),
    color=(0, 0, 0),
    *,
    font_path: str | Path | None = None,
    style: str = "sans",
    align: str = "center",
    position: tuple[int, int] | None = None,
    line_spacing: float = 1.3,
    margin: int = 16,
    wrap: bool = True,
    fit: bool = True,
    min_font_size: int = 10,
) -> Image.Image:
    """Render ``text`` (``\\n`` separates lines) into a new RGB image of ``size = (width, height)``.

    Args:
        font_size: starting size in px; with ``fit=True`` it shrinks until the block fits inside the margins.
        background, color: anything Pillow accepts (``"white"``, ``(r, g, b)``) ; background may also be a
            PIL image, which is resized to ``size`` and drawn on.
        font_path / style: a font file, or the bundled ``"sans"`` / ``"serif"`` Noto SC.
        align: ``"center"``, ``"left"`` or ``"right"`` for each line.
        position: top-left (x, y) of the text block; default centres the block in the image.
        wrap: wrap long lines to the width (at spaces, or between CJK characters).
    """
    w, h = int(size[0]), int(size[1])
    if isinstance(background, Image.Image):
        img = background.convert("RGB").resize((w, h))
    else:
        img = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(img)
    max_w, max_h = w - 2 * margin, h - 2 * margin
    fs = int(font_size)
    while True:
        font = load_font(fs, str(font_path) if font_path else None, style)
        lines: list[str] = []
        for raw in text.split("\n"):
            lines.extend(_wrap_line(draw, raw, font, max_w) if wrap else [raw])
        ascent, descent = font.getmetrics()
        line_h = int(round((ascent + descent) * line_spacing))
        block_h = line_h * (len(lines) - 1) + ascent + descent
        widths = [_text_width(draw, ln, font) for ln in lines]
        block_w = max(widths, default=0)
        if not fit or fs <= min_font_size or (block_w <= max_w and block_h <= max_h):
            break
        fs = max(min_font_size, int(fs * 0.9))
    if position is None:
        x0, y0 = (w - block_w) / 2, (h - block_h) / 2
    else:
        x0, y0 = position
    for i, (ln, lw) in enumerate(zip(lines, widths)):
        if align == "center":
            x = x0 + (block_w - lw) / 2
        elif align == "right":
            x = x0 + block_w - lw
        else:
            x = x0
        draw.text((x, y0 + i * line_h), ln, font=font, fill=color)
    return img
