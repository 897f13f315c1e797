"""Text-rendering accuracy of a generator over a prompt set (CVTG-2K style word accuracy and NED).

    result = evaluate_text_rendering(generate, prompts)      # generate(list[str]) -> list[PIL.Image]
    result["mean"]          # {"word_accuracy": ..., "ned": ..., "char_accuracy": ..., "exact": ...}
    result["per_prompt"]    # one dict per prompt: prompt, target, recognized, the metrics

Targets are the quoted text of each prompt (``rewards.text.target_text``, the rule the OCR reward and the data filter
use too) unless ``targets`` gives them. OCR defaults to
RapidOCR through ``rewards.recognize_text`` (this repository; imported lazily).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable, Sequence

from rewards.text import target_text

__all__ = ["normalize", "edit_distance", "word_accuracy", "ned_score", "char_accuracy", "split_words",
           "evaluate_text_rendering"]


def normalize(text: str | None) -> str:
    """NFKC, case-folded, whitespace collapsed to single spaces and stripped."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return " ".join(text.split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (characters; one CJK character = one unit): the OCR reward's own."""
    from rewards.text import levenshtein

    return levenshtein(a, b)


_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def split_words(text: str | None) -> list[str]:
    """Words of a normalised text: whitespace-separated Latin tokens (edge punctuation stripped), and every CJK
    character as its own word (Chinese has no spaces; CVTG-2K is English-only, this is the natural extension)."""
    out = []
    for tok in _WORD.findall(normalize(text)):
        tok = _PUNCT.sub("", tok)
        if tok:
            out.append(tok)
    return out


def word_accuracy(recognized: str | None, target: str | None) -> float | None:
    """Fraction of the target's words found among the recognised words (each recognised word matches once).

    CVTG-2K's word accuracy: a word counts only if read exactly (after case-folding). None for an empty target.
    """
    tw = split_words(target)
    if not tw:
        return None
    pool: dict[str, int] = {}
    for w in split_words(recognized):
        pool[w] = pool.get(w, 0) + 1
    hit = 0
    for w in tw:
        if pool.get(w, 0) > 0:
            pool[w] -= 1
            hit += 1
    return hit / len(tw)


def _compact(text: str | None) -> str:
    return "".join(normalize(text).split())


def ned_score(recognized: str | None, target: str | None) -> float | None:
    """1 - normalised edit distance = ``1 - lev(r, t) / max(len r, len t)`` on normalised, whitespace-free text
    (CVTG-2K reports this 'NED' with higher = better). None for an empty target."""
    r, t = _compact(recognized), _compact(target)
    if not t:
        return None
    return 1.0 - edit_distance(r, t) / max(len(r), len(t))


def char_accuracy(recognized: str | None, target: str | None) -> float | None:
    """``1 - min(lev, len t) / len t`` (the OCR reward's score; extra recognised text is penalised up to 0)."""
    r, t = _compact(recognized), _compact(target)
    if not t:
        return None
    return 1.0 - min(edit_distance(r, t), len(t)) / len(t)


def _default_ocr(images):
    try:
        from rewards import recognize_text
    except ImportError as e:  # pragma: no cover
        raise ImportError("the default OCR needs this repository's `rewards` package; pass ocr=...") from e
    return [recognize_text(im, line_sep=" ") for im in images]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def evaluate_text_rendering(generate: Callable[[list[str]], Sequence[Any]], prompts: Sequence[str],
                            ocr: Callable[[list[Any]], list[str]] | None = None,
                            targets: Sequence[str | None] | None = None, batch_size: int = 4,
                            scorer: Callable[..., list] | None = None, keep_images: bool = False,
                            progress: bool = False) -> dict:
    """Generate an image per prompt, OCR it, and score it against the prompt's quoted text.

    * ``generate(prompts) -> images`` (PIL images; called with batches of ``batch_size`` prompts).
    * ``ocr(images) -> list[str]``: recognised text per image; default RapidOCR via ``rewards.recognize_text``.
    * ``targets``: the text each prompt should render; default the prompt's quoted text. Prompts without a
      target get None metrics and are left out of the means.
    * ``scorer``: optional reward-style ``scorer(prompts, images, text=targets) -> list[float | None]`` (for example
      ``rewards.get_reward("ocr")``), reported as ``score``.

    Returns ``{"per_prompt": [...], "mean": {...}, "n": int, "n_scored": int}`` with word_accuracy (CVTG-2K),
    ned (1 - normalised edit distance, CVTG-2K), char_accuracy (the OCR reward's form) and exact (all text right).
    """
    prompts = list(prompts)
    if targets is not None and len(targets) != len(prompts):
        raise ValueError(f"{len(targets)} targets for {len(prompts)} prompts")
    tg = [(targets[i] if targets is not None and targets[i] else target_text(p or "")) for i, p in enumerate(prompts)]
    ocr = ocr or _default_ocr
    rows = []
    batches = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="text eval")
    for s in batches:
        bp, bt = prompts[s:s + batch_size], tg[s:s + batch_size]
        images = list(generate(bp))
        if len(images) != len(bp):
            raise ValueError(f"generate returned {len(images)} images for {len(bp)} prompts")
        texts = list(ocr(images))
        if len(texts) != len(images):
            raise ValueError(f"ocr returned {len(texts)} texts for {len(images)} images")
        scores = scorer(bp, images, text=bt) if scorer is not None else [None] * len(bp)
        for p, t, img, rec, sc in zip(bp, bt, images, texts, scores):
            row = {"prompt": p, "target": t, "recognized": rec,
                   "word_accuracy": word_accuracy(rec, t), "ned": ned_score(rec, t),
                   "char_accuracy": char_accuracy(rec, t),
                   "exact": None if not t else float(_compact(rec) == _compact(t))}
            if scorer is not None:
                row["score"] = sc
            if keep_images:
                row["image"] = img
            rows.append(row)
    keys = ["word_accuracy", "ned", "char_accuracy", "exact"] + (["score"] if scorer is not None else [])
    mean = {k: _mean([r[k] for r in rows]) for k in keys}
    return {"per_prompt": rows, "mean": mean, "n": len(rows),
            "n_scored": sum(r["word_accuracy"] is not None for r in rows)}
