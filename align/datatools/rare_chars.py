"""Rare characters: find characters that are under-represented in a corpus and build strings from them.

Qwen-Image's report adds synthetic renderings because rare (long-tail) Chinese characters hardly occur in real
images. These helpers pick such characters so they can be rendered with :mod:`align.datatools.synthesis`.
"""

from __future__ import annotations

import random
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

__all__ = ["char_frequencies", "rare_characters", "rare_strings", "cjk_characters"]


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch)[0] in ("L", "N")


def char_frequencies(corpus: str | Iterable[str], letters_only: bool = True) -> Counter:
    """Character counts over a string or an iterable of strings (whitespace and, by default, punctuation ignored)."""
    texts = [corpus] if isinstance(corpus, str) else corpus
    c: Counter = Counter()
    for t in texts:
        c.update(ch for ch in t if not ch.isspace() and (not letters_only or _is_letter(ch)))
    return c


def cjk_characters(start: int = 0x4E00, end: int = 0x9FFF, font_style: str | None = "sans") -> list[str]:
    """The CJK Unified Ideographs in [start, end] (inclusive); with ``font_style``, only those the font can draw."""
    chars = [chr(o) for o in range(start, end + 1) if unicodedata.category(chr(o)) == "Lo"]
    if font_style:
        from .synthesis import missing_glyphs

        missing = set(missing_glyphs("".join(chars), font_style))
        chars = [c for c in chars if c not in missing]
    return chars


def rare_characters(corpus: str | Iterable[str] | Counter | None = None, candidates: Iterable[str] | None = None,
                    max_count: int | None = 1, max_frequency: float | None = None,
                    script: str | None = "cjk", limit: int | None = None) -> list[str]:
    """Characters whose frequency in ``corpus`` is below a threshold, rarest first (ties in code-point order).

    * ``corpus``: text(s), or a ``Counter`` from :func:`char_frequencies`. ``candidates``: the characters to
      consider (e.g. a list of characters you need, or :func:`cjk_characters`); characters absent from the corpus
      count 0. Without candidates, the corpus's own characters are the candidates.
    * A character is rare when ``count <= max_count`` (absolute) and/or ``count / total <= max_frequency``
      (relative); both given = both must hold.
    * ``script``: ``"cjk"`` keeps CJK ideographs only, ``"latin"`` ASCII letters only, None keeps all.
    """
    if corpus is None and candidates is None:
        raise ValueError("give a corpus, candidates, or both")
    if max_count is None and max_frequency is None:
        raise ValueError("give max_count and/or max_frequency")
    counts = corpus if isinstance(corpus, Counter) else (char_frequencies(corpus) if corpus is not None else Counter())
    total = sum(counts.values())
    pool = list(dict.fromkeys(candidates)) if candidates is not None else list(counts)
    if script == "cjk":
        pool = [c for c in pool if "CJK UNIFIED IDEOGRAPH" in unicodedata.name(c, "")]
    elif script == "latin":
        pool = [c for c in pool if c.isascii() and c.isalpha()]
    elif script is not None:
        raise ValueError("script must be 'cjk', 'latin' or None")
    out = []
    for ch in pool:
        n = counts.get(ch, 0)
        if max_count is not None and n > max_count:
            continue
        if max_frequency is not None and (n / total if total else 0.0) > max_frequency:
            continue
        out.append(ch)
    out.sort(key=lambda ch: (counts.get(ch, 0), ord(ch)))
    return out[:limit] if limit is not None else out


def rare_strings(rare: Sequence[str], n: int, min_len: int = 2, max_len: int = 6, seed: int = 0,
                 common: Sequence[str] | None = None, common_ratio: float = 0.0, separator: str = "") -> list[str]:
    """``n`` strings of ``min_len..max_len`` characters drawn from ``rare`` (each string has at least one rare char).

    Every rare character is used before any repeats (a seeded shuffle, cycled), so a small ``n`` already covers
    the list. ``common`` + ``common_ratio`` mix frequent characters in, which looks more like real text.
    Deterministic for a given seed.
    """
    if not rare:
        raise ValueError("no rare characters")
    if min_len < 1 or max_len < min_len:
        raise ValueError("need 1 <= min_len <= max_len")
    rng = random.Random(f"rare_strings/{seed}")
    order = list(rare)
    rng.shuffle(order)
    pos = 0
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        chars = []
        for j in range(length):
            if common and j > 0 and rng.random() < common_ratio:
                chars.append(rng.choice(list(common)))
            else:
                chars.append(order[pos % len(order)])
                pos += 1
        out.append(separator.join(chars))
    return out
