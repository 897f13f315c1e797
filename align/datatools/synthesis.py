"""Synthetic text-rendering data (Qwen-Image report §3.4): ``plain``, ``scene`` and ``template`` modes.

* ``plain``    — pure rendering: the text on a flat colour.
* ``scene``    — compositional: the text on a card (paper, sign, board, label) warped in perspective and pasted on a
  textured / gradient background.
* ``template`` — complex layouts: a slide (title bar with the text), a poster, or an app window (UI).

Only the requested text is drawn (decorations are shapes, never letters), so the caption, which quotes the text,
describes every glyph in the image. Chinese and English (and mixed) with Noto Sans SC / Noto Serif SC from
``pylopdf-fonts-zh-cn``. Everything is seeded: the same (text, mode, size, seed, index) gives the same pixels.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import random
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "MODES",
    "FONT_STYLES",
    "font_path",
    "load_font",
    "detect_language",
    "missing_glyphs",
    "render_text_image",
    "synthesize_text_images",
    "perspective_coefficients",
]

MODES = ("plain", "scene", "template")
FONT_STYLES = ("sans", "serif", "sans-bold", "serif-bold")
LAYOUTS = ("horizontal", "multiline", "vertical")
SCENE_BACKGROUNDS = ("gradient", "texture", "shapes")
TEMPLATE_KINDS = ("slide", "poster", "ui")

# named colours so captions can say what they show
_LIGHT = [("white", (250, 250, 250)), ("cream", (245, 238, 214)), ("light grey", (222, 222, 222)),
          ("pale yellow", (250, 240, 160)), ("light blue", (196, 222, 245)), ("pink", (246, 200, 214)),
          ("mint green", (196, 238, 208))]
_DARK = [("black", (18, 18, 18)), ("navy blue", (24, 38, 92)), ("dark green", (22, 82, 46)),
         ("dark red", (128, 22, 28)), ("charcoal", (54, 54, 60)), ("purple", (78, 36, 112)),
         ("brown", (92, 56, 30))]
_VIVID = [("red", (206, 40, 40)), ("orange", (236, 128, 28)), ("blue", (36, 98, 206)),
          ("green", (40, 150, 70)), ("teal", (20, 130, 136)), ("purple", (120, 56, 168))]


# ------------------------------------------------------------------------------------------------------ fonts
def font_path(style: str = "sans") -> str:
    """Path of the Noto Sans SC (``sans``) or Noto Serif SC (``serif``) OpenType font from pylopdf-fonts-zh-cn.

    Located with ``importlib.util.find_spec`` (the package is not imported).
    """
    base = style.split("-")[0]
    name = {"sans": "NotoSansSC-Regular.otf", "serif": "NotoSerifSC-Regular.otf"}.get(base)
    if name is None:
        raise ValueError(f"unknown font style {style!r}; choose from {FONT_STYLES}")
    spec = importlib.util.find_spec("pylopdf_fonts_zh_cn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pylopdf-fonts-zh-cn is not installed (pip install pylopdf-fonts-zh-cn==0.1.1)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / name
        if p.is_file():
            return str(p)
    raise FileNotFoundError(f"{name} not found in {list(spec.submodule_search_locations)}")


@functools.lru_cache(maxsize=256)
def load_font(style: str = "sans", size: int = 32) -> ImageFont.FreeTypeFont:
    """A PIL FreeType font for a style of :data:`FONT_STYLES` (the ``-bold`` styles are drawn with a stroke)."""
    return ImageFont.truetype(font_path(style), size=int(size))


def _stroke(style: str, size: int) -> int:
    return max(1, round(size / 28)) if style.endswith("-bold") else 0


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2FA1F or 0xF900 <= o <= 0xFAFF
            or 0x3000 <= o <= 0x303F or 0xFF00 <= o <= 0xFFEF)


def detect_language(text: str) -> str:
    """``zh`` (only CJK letters), ``en`` (only Latin letters), ``mixed`` (both), ``other`` (neither)."""
    has_cjk = any(_is_cjk(c) and unicodedata.category(c).startswith("L") for c in text)
    has_latin = any(c.isascii() and c.isalpha() for c in text)
    if has_cjk and has_latin:
        return "mixed"
    if has_cjk:
        return "zh"
    if has_latin:
        return "en"
    return "other"


@functools.lru_cache(maxsize=8)
def _notdef_mask(style: str) -> bytes:
    font = load_font(style, 32)
    m = font.getmask("\U0010FFFD")
    return bytes(m.size) + bytes(m)


def missing_glyphs(text: str, style: str = "sans") -> list[str]:
    """Characters of ``text`` the font draws as the .notdef box (i.e. cannot render); whitespace is ignored."""
    font = load_font(style, 32)
    ref = _notdef_mask(style)
    out = []
    for ch in dict.fromkeys(text):
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf"):
            continue
        m = font.getmask(ch)
        if bytes(m.size) + bytes(m) == ref:
            out.append(ch)
    return out


# ----------------------------------------------------------------------------------------------- text layout
def _wrap(text: str, font, max_w: float, stroke: int) -> list[str] | None:
    """Greedy wrap; breaks at spaces for Latin words and anywhere between CJK characters. None if a word is too wide."""
    tokens: list[str] = []
    buf = ""
    for ch in text:
        if _is_cjk(ch):
            if buf:
                tokens.append(buf)
                buf = ""
            tokens.append(ch)
        elif ch == " ":
            buf += ch
            tokens.append(buf)
            buf = ""
        else:
            buf += ch
    if buf:
        tokens.append(buf)
    lines: list[str] = []
    cur = ""
    for tok in tokens:
        cand = cur + tok
        if font.getlength(cand.rstrip()) + 2 * stroke <= max_w or not cur.strip():
            if font.getlength(cand.strip()) + 2 * stroke > max_w:
                return None
            cur = cand
        else:
            lines.append(cur.strip())
            cur = tok.lstrip()
    if cur.strip():
        lines.append(cur.strip())
    return lines


def _layout(text: str, style: str, size: int, layout: str, box_w: float, box_h: float):
    """(lines, line_height, block_w, block_h) or None when it does not fit."""
    font = load_font(style, size)
    stroke = _stroke(style, size)
    asc, desc = font.getmetrics()
    lh = (asc + desc) * 1.12 + 2 * stroke
    if layout == "vertical":
        lines = [c for c in text if not c.isspace()]
        lh = size * 1.08 + 2 * stroke
        w = max(font.getlength(c) for c in lines) + 2 * stroke
        h = lh * len(lines)
    elif layout == "multiline":
        lines = _wrap(text, font, box_w, stroke)
        if lines is None:
            return None
        w = max(font.getlength(line) for line in lines) + 2 * stroke
        h = lh * len(lines)
    else:
        lines = [text]
        w = font.getlength(text) + 2 * stroke
        h = lh
    if w > box_w or h > box_h:
        return None
    return lines, lh, w, h


def _fit(text, style, layout, box_w, box_h, max_size=None, min_size=8):
    """Largest font size whose layout fits the box (binary search)."""
    hi = int(max_size or box_h)
    lo = min_size
    if _layout(text, style, lo, layout, box_w, box_h) is None:
        return lo, _layout(text, style, lo, layout, 1e9, 1e9)
    best = lo
    while lo <= hi:
        mid = (lo + hi) // 2
        if _layout(text, style, mid, layout, box_w, box_h) is not None:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best, _layout(text, style, best, layout, box_w, box_h)


def _draw_block(img: Image.Image, text: str, box: tuple[float, float, float, float], style: str, layout: str,
                fill, max_size: int | None = None, align: str = "center") -> int:
    """Draw text fitted and centred in box (x0, y0, x1, y1); returns the font size used."""
    x0, y0, x1, y1 = box
    size, lay = _fit(text, style, layout, x1 - x0, y1 - y0, max_size)
    lines, lh, bw, bh = lay
    font = load_font(style, size)
    stroke = _stroke(style, size)
    draw = ImageDraw.Draw(img)
    top = y0 + (y1 - y0 - bh) / 2
    if layout == "vertical":
        cx = (x0 + x1) / 2
        for k, ch in enumerate(lines):
            draw.text((cx, top + (k + 0.5) * lh), ch, font=font, fill=fill, anchor="mm",
                      stroke_width=stroke, stroke_fill=fill)
        return size
    for k, line in enumerate(lines):
        lw = font.getlength(line) + 2 * stroke
        if align == "left":
            x = x0 + stroke
        else:
            x = x0 + (x1 - x0 - lw) / 2 + stroke
        y = top + k * lh + (lh - sum(font.getmetrics())) / 2 + stroke
        draw.text((x, y), line, font=font, fill=fill, stroke_width=stroke, stroke_fill=fill)
    return size


# --------------------------------------------------------------------------------------------- backgrounds
def _luma(rgb) -> float:
    r, g, b = rgb[:3]
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255.0


def _pair(rng: random.Random):
    """(background name, rgb, text name, rgb) with a clear luminance gap."""
    if rng.random() < 0.65:
        bg, fg = rng.choice(_LIGHT), rng.choice(_DARK + _VIVID[:3] + [_VIVID[5]])
    else:
        bg, fg = rng.choice(_DARK + _VIVID), rng.choice(_LIGHT)
    if abs(_luma(bg[1]) - _luma(fg[1])) < 0.35:
        fg = ("black", (18, 18, 18)) if _luma(bg[1]) > 0.5 else ("white", (250, 250, 250))
    return bg, fg


def _gradient(size, c0, c1, angle: float) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx / max(w - 1, 1)) * math.cos(angle) + (yy / max(h - 1, 1)) * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    arr = np.asarray(c0, np.float32)[None, None] * (1 - t[..., None]) + np.asarray(c1, np.float32)[None, None] * t[..., None]
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def _texture(size, base, nrng: np.random.Generator) -> Image.Image:
    """Smooth value noise around a base colour (paper / wall / fabric-like)."""
    w, h = size
    out = np.zeros((h, w), np.float32)
    for octave, amp in ((8, 1.0), (32, 0.5), (128, 0.25)):
        small = nrng.standard_normal((max(2, h * octave // max(w, h) // 4 + 2), max(2, octave // 4 + 2)))
        layer = Image.fromarray(((small - small.min()) / (np.ptp(small) + 1e-6) * 255).astype(np.uint8))
        out += amp * (np.asarray(layer.resize((w, h), Image.BICUBIC), np.float32) / 255.0 - 0.5)
    out = out / 1.75
    arr = np.asarray(base, np.float32)[None, None] + 90.0 * out[..., None]
    arr += nrng.normal(0, 6, (h, w, 1))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def _shapes(img: Image.Image, rng: random.Random, n: int, alpha: int = 120, blur: float = 0.0) -> Image.Image:
    w, h = img.size
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    for _ in range(n):
        c = rng.choice(_LIGHT + _DARK + _VIVID)[1] + (alpha,)
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.6) * h
        if rng.random() < 0.5:
            d.ellipse((x0, y0, x1, y1), fill=c)
        else:
            d.rectangle((x0, y0, x1, y1), fill=c)
    if blur:
        layer = layer.filter(ImageFilter.GaussianBlur(blur))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def perspective_coefficients(dst_quad: Sequence[tuple[float, float]], src_quad: Sequence[tuple[float, float]]):
    """The 8 coefficients for ``Image.transform(size, Image.PERSPECTIVE, coeffs)`` mapping output (dst) -> input (src).

    PIL maps each OUTPUT pixel (x, y) to the input point ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (...)),
    so the system is solved from the destination corners to the source corners.
    """
    A, B = [], []
    for (x, y), (u, v) in zip(dst_quad, src_quad):
        A.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        A.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        B += [u, v]
    return np.linalg.solve(np.asarray(A, np.float64), np.asarray(B, np.float64)).tolist()


# ------------------------------------------------------------------------------------------------- modes
_STYLE_WORDS = {"sans": "sans-serif font", "serif": "serif font", "sans-bold": "bold sans-serif font",
                "serif-bold": "bold serif font"}


def _a(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase
_LAYOUT_WORDS = {"horizontal": "on one line", "multiline": "over several lines", "vertical": "in a vertical column"}


def _q(text: str) -> str:
    return f'"{text}"'


def _render_plain(text, size, rng, nrng, style, layout, background_type):
    (bgn, bg), (fgn, fg) = _pair(rng)
    img = Image.new("RGB", size, bg)
    w, h = size
    m = rng.uniform(0.06, 0.14)
    _draw_block(img, text, (w * m, h * m, w * (1 - m), h * (1 - m)), style, layout, fg)
    prompt = (f"The text {_q(text)} written {_LAYOUT_WORDS[layout]} in {_a(fgn + ' ' + _STYLE_WORDS[style])} "
              f"on a plain {bgn} background")
    return img, prompt, background_type or "solid"


_SURFACES = [("paper note", _LIGHT[:2] + [_LIGHT[3]]), ("shop sign", _DARK + _VIVID), ("wooden board", [("brown", (150, 102, 60))]),
             ("white board", [_LIGHT[0]]), ("label", _LIGHT), ("street banner", _VIVID)]


def _render_scene(text, size, rng, nrng, style, layout, background_type):
    w, h = size
    kind = background_type or rng.choice(SCENE_BACKGROUNDS)
    c0, c1 = rng.choice(_LIGHT + _DARK + _VIVID)[1], rng.choice(_LIGHT + _DARK + _VIVID)[1]
    if kind == "gradient":
        bg = _gradient(size, c0, c1, rng.uniform(0, math.pi))
        scene_desc = "a colourful gradient background"
    elif kind == "texture":
        bg = _texture(size, c0, nrng)
        scene_desc = "a textured wall"
    elif kind == "shapes":
        bg = _shapes(_gradient(size, c0, c1, rng.uniform(0, math.pi)), rng, 8, alpha=160, blur=max(w, h) / 60)
        scene_desc = "a blurred background of coloured shapes"
    else:
        raise ValueError(f"scene background_type must be one of {SCENE_BACKGROUNDS}, got {kind!r}")
    surface, colours = rng.choice(_SURFACES)
    cn, cc = rng.choice(colours)
    fg = (18, 18, 18) if _luma(cc) > 0.5 else (250, 250, 250)
    # the card, drawn flat, then warped
    cw, ch = int(w * rng.uniform(0.62, 0.8)), int(h * rng.uniform(0.42, 0.62))
    if layout == "vertical":
        cw, ch = int(w * rng.uniform(0.3, 0.42)), int(h * rng.uniform(0.7, 0.82))
    card = Image.new("RGB", (cw, ch), cc)
    if kind == "texture" or surface in ("paper note", "wooden board"):
        card = Image.blend(card, _texture((cw, ch), cc, nrng), 0.35)
    pad = 0.1
    _draw_block(card, text, (cw * pad, ch * pad, cw * (1 - pad), ch * (1 - pad)), style, layout, fg)
    # destination quad: centred, each corner jittered (a mild perspective + rotation)
    cx, cy = w / 2 + rng.uniform(-0.06, 0.06) * w, h / 2 + rng.uniform(-0.06, 0.06) * h
    j = 0.07
    base = [(-cw / 2, -ch / 2), (cw / 2, -ch / 2), (cw / 2, ch / 2), (-cw / 2, ch / 2)]
    rot = rng.uniform(-0.12, 0.12)
    dst = []
    for x, y in base:
        x, y = x * math.cos(rot) - y * math.sin(rot), x * math.sin(rot) + y * math.cos(rot)
        dst.append((cx + x + rng.uniform(-j, j) * cw, cy + y + rng.uniform(-j, j) * ch))
    src = [(0, 0), (cw, 0), (cw, ch), (0, ch)]
    coeffs = perspective_coefficients(dst, src)
    warped = card.transform(size, Image.PERSPECTIVE, coeffs, Image.BICUBIC)
    mask = Image.new("L", (cw, ch), 255).transform(size, Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    # soft shadow
    off = max(2, int(max(w, h) / 100))
    shadow = Image.new("L", size, 0)
    shadow.paste(mask.filter(ImageFilter.GaussianBlur(max(w, h) / 80)).point(lambda v: int(v * 0.45)), (off, off))
    out = Image.composite(Image.new("RGB", size, (0, 0, 0)), bg, shadow)
    out = Image.composite(warped, out, mask)
    prompt = (f"A photo of {_a(cn + ' ' + surface)} with the text {_q(text)} in {_a(_STYLE_WORDS[style])}, "
              f"in front of {scene_desc}")
    return out, prompt, kind


def _render_template(text, size, rng, nrng, style, layout, background_type):
    w, h = size
    kind = background_type or rng.choice(TEMPLATE_KINDS)
    (bgn, bgc), (fgn, fgc) = _pair(rng)
    accent_n, accent = rng.choice(_VIVID + _DARK[1:3])
    if kind == "slide":
        img = Image.new("RGB", size, rng.choice(_LIGHT[:3])[1])
        d = ImageDraw.Draw(img)
        bar_h = h * rng.uniform(0.24, 0.32)
        d.rectangle((0, 0, w, bar_h), fill=accent)
        title_fg = (250, 250, 250) if _luma(accent) < 0.55 else (18, 18, 18)
        lay = layout if layout != "vertical" else "horizontal"
        _draw_block(img, text, (w * 0.06, bar_h * 0.12, w * 0.94, bar_h * 0.88), style, lay, title_fg)
        # body: bullet points as grey bars and a picture placeholder
        y = bar_h + h * 0.08
        for _ in range(rng.randint(3, 5)):
            if y > h * 0.9:
                break
            d.ellipse((w * 0.07, y, w * 0.07 + h * 0.025, y + h * 0.025), fill=accent)
            d.rounded_rectangle((w * 0.12, y, w * rng.uniform(0.35, 0.55), y + h * 0.025), h * 0.01, fill=(170, 170, 175))
            y += h * 0.09
        d.rectangle((w * 0.62, bar_h + h * 0.08, w * 0.93, h * 0.9), outline=accent, width=max(1, w // 200),
                    fill=(230, 232, 236))
        d.rectangle((0, h * 0.96, w, h), fill=accent)
        prompt = (f"A presentation slide with {_a(accent_n)} title bar showing the title {_q(text)} in "
                  f"{_a(_STYLE_WORDS[style])}, bullet points and a picture placeholder")
    elif kind == "poster":
        img = _gradient(size, bgc, tuple(int(0.8 * c) for c in bgc), rng.uniform(0, math.pi))
        img = _shapes(img, rng, 5, alpha=70)
        d = ImageDraw.Draw(img)
        bar_h = h * 0.07
        d.rectangle((0, 0, w, bar_h), fill=accent)
        d.rectangle((0, h - bar_h, w, h), fill=accent)
        # a plate behind the headline keeps it readable over the shapes
        plate = (w * 0.08, h * 0.25, w * 0.92, h * 0.75)
        d.rounded_rectangle(plate, radius=int(min(w, h) * 0.03), fill=bgc)
        _draw_block(img, text, (plate[0] + w * 0.04, plate[1] + h * 0.04, plate[2] - w * 0.04, plate[3] - h * 0.04),
                    style, layout, fgc)
        prompt = (f"{_a(bgn).capitalize()} poster with the text {_q(text)} in {_a(fgn + ' ' + _STYLE_WORDS[style])}, "
                  f"with {accent_n} bands at the top and bottom")
    elif kind == "ui":
        img = Image.new("RGB", size, (228, 230, 235))
        d = ImageDraw.Draw(img)
        m = min(w, h) * 0.05
        win = (m, m, w - m, h - m)
        d.rounded_rectangle(win, radius=int(m * 0.6), fill=(252, 252, 252), outline=(190, 190, 196), width=max(1, w // 256))
        bar_h = h * 0.1
        d.rounded_rectangle((win[0], win[1], win[2], win[1] + bar_h), radius=int(m * 0.6), fill=accent)
        d.rectangle((win[0], win[1] + bar_h / 2, win[2], win[1] + bar_h), fill=accent)
        r = bar_h * 0.18
        for k, col in enumerate([(236, 95, 87), (245, 190, 50), (98, 197, 84)]):
            cx = win[0] + bar_h * 0.5 + k * r * 3
            cy = win[1] + bar_h / 2
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col)
        # content card with the text, and a button (a shape, no label)
        cbox = (win[0] + w * 0.06, win[1] + bar_h + h * 0.08, win[2] - w * 0.06, win[3] - h * 0.22)
        d.rounded_rectangle(cbox, radius=int(m * 0.4), fill=bgc)
        _draw_block(img, text, (cbox[0] + w * 0.03, cbox[1] + h * 0.03, cbox[2] - w * 0.03, cbox[3] - h * 0.03),
                    style, layout, fgc)
        d.rounded_rectangle((w * 0.62, win[3] - h * 0.15, win[2] - w * 0.06, win[3] - h * 0.06),
                            radius=int(m * 0.4), fill=accent)
        prompt = (f"A screenshot of an app window with {_a(accent_n)} title bar, showing the text {_q(text)} in "
                  f"{_a(_STYLE_WORDS[style])} on {_a(bgn)} card")
    else:
        raise ValueError(f"template background_type must be one of {TEMPLATE_KINDS}, got {kind!r}")
    if kind == "slide" and layout == "vertical":
        layout = "horizontal"
    return img, prompt, kind, layout


def _choose_layout(text: str, rng: random.Random, layout: str | None, mode: str) -> str:
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"text_layout must be one of {LAYOUTS}, got {layout!r}")
        return layout
    letters = [c for c in text if not c.isspace()]
    options = ["horizontal"]
    if len(text) > 6:
        options.append("multiline")
    if letters and all(_is_cjk(c) for c in letters) and 2 <= len(letters) <= 10 and mode != "template":
        options.append("vertical")
    return rng.choice(options)


def render_text_image(text: str, mode: str = "plain", size: tuple[int, int] | int = (512, 512), seed: int = 0,
                      font_style: str | None = None, text_layout: str | None = None,
                      background_type: str | None = None) -> tuple[Image.Image, dict]:
    """Render ``text`` in one synthesis mode; returns ``(RGB image of exactly size=(width, height), metadata)``.

    metadata: ``prompt`` (a caption quoting the text), ``text``, ``language`` (zh/en/mixed/other), ``font_style``
    (sans, serif, sans-bold, serif-bold), ``text_layout`` (horizontal, multiline, vertical), ``background_type``
    (plain: solid; scene: gradient/texture/shapes; template: slide/poster/ui), ``mode``, ``seed``.
    Options left None are drawn from the seeded generator.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(size, int):
        size = (size, size)
    size = (int(size[0]), int(size[1]))
    if not text or not text.strip():
        raise ValueError("empty text")
    rng = random.Random(f"qwen-image-align/synth/{seed}/{mode}/{text}")
    nrng = np.random.default_rng(rng.getrandbits(63))
    style = font_style or rng.choice(FONT_STYLES)
    if style not in FONT_STYLES:
        raise ValueError(f"font_style must be one of {FONT_STYLES}, got {style!r}")
    layout = _choose_layout(text, rng, text_layout, mode)
    if mode == "plain":
        if background_type not in (None, "solid"):
            raise ValueError("plain mode has background_type 'solid' only")
        img, prompt, bgt = _render_plain(text, size, rng, nrng, style, layout, background_type)
    elif mode == "scene":
        img, prompt, bgt = _render_scene(text, size, rng, nrng, style, layout, background_type)
    else:
        img, prompt, bgt, layout = _render_template(text, size, rng, nrng, style, layout, background_type)
    assert img.size == size
    meta = {"prompt": prompt, "text": text, "language": detect_language(text), "font_style": style,
            "text_layout": layout, "background_type": bgt, "mode": mode, "seed": int(seed)}
    return img.convert("RGB"), meta


def synthesize_text_images(texts: Iterable[str], modes: Sequence[str] = MODES, size: tuple[int, int] | int = (512, 512),
                           seed: int = 0, per_text: int = 1, font_styles: Sequence[str] | None = None,
                           skip_missing_glyphs: bool = True, on_skip=None) -> list[dict]:
    """Rows ``{"image": PIL.Image, **metadata}`` for every text x mode x ``per_text`` variant.

    Variant k of text i in mode m uses seed ``seed + 1000003 * k + i`` (stored in the row), so a row does not
    depend on which other texts are in the batch ... except through its index i. As in the report's pure
    rendering, a text with a glyph the font cannot draw is skipped (``on_skip(text, missing_chars)`` is called).
    """
    rows = []
    for i, text in enumerate(texts):
        styles = list(font_styles or FONT_STYLES)
        if skip_missing_glyphs:
            miss = missing_glyphs(text, "sans")
            if miss:
                if on_skip is not None:
                    on_skip(text, miss)
                continue
        for k in range(per_text):
            for mode in modes:
                s = seed + 1000003 * k + i
                style = random.Random(f"style/{s}/{mode}").choice(styles)
                img, meta = render_text_image(text, mode=mode, size=size, seed=s, font_style=style)
                rows.append({"image": img, **meta})
    return rows
