"""Pure-Python text utilities for text-rendering rewards.

No dependencies beyond the standard library: quote extraction from prompts, normalisation and the
character-level Levenshtein score used by the ``ocr`` reward.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "extract_quoted_text",
    "target_text",
    "normalize_text",
    "levenshtein",
    "text_accuracy",
]

# The one rule for "the text a prompt asks to render", shared by the OCR reward, the OCR-agreement data filter and
# the text-rendering evaluation. One alternation scanned left to right, so the outermost quote wins and a quote
# nested inside another (“He said 'hi'”) stays part of the outer segment; every kind counts, so `"hi" and ‘bye’`
# gives both segments.
# - ASCII " ... ", fullwidth ＂ ... ＂, curly “ ... ”, CJK corner brackets 「 ... 」 and 『 ... 』.
# - ASCII ' ... ' and curly ‘ ... ’ (and fullwidth ＇ ... ＇): the opening ' must not follow a Latin letter or digit
#   and the closing ' / ’ must not precede one, so apostrophes are not quotes (don't, cats') and may sit inside a
#   quote ('It's late', ‘it’s’); CJK text may touch the quote (写着'你好'的牌子).
# - Not quotes: 《》 and 〈〉 mark titles of works in running Chinese text (阅读《红楼梦》的女孩 asks for no rendered
#   text); quote the text to render with one of the marks above instead.
_QUOTES = re.compile(
    r'"([^"]*)"|＂([^＂]*)＂|“([^”]*)”|「([^」]*)」|『([^』]*)』|＇([^＇]*)＇'
    r"|(?<![A-Za-z0-9])'([^\n]+?)'(?![A-Za-z0-9])"
    r"|‘([^‘\n]+?)’(?![A-Za-z0-9])"
)


def extract_quoted_text(prompt: str | None) -> list[str]:
    """All quoted segments of ``prompt``, in order of appearance (the rule is in the comment above).

    Empty or whitespace-only quotes are skipped; an unbalanced quote is ignored.

    >>> extract_quoted_text('a sign that says "OPEN" and 「营业中」')
    ['OPEN', '营业中']
    >>> extract_quoted_text("don't write 'Hi' or ‘Bye’")
    ['Hi', 'Bye']
    """
    if not prompt:
        return []
    out = []
    for m in _QUOTES.finditer(prompt):
        seg = next(g for g in m.groups() if g is not None)
        if seg.strip():
            out.append(seg)
    return out


def target_text(prompt: str, sep: str = " ") -> str | None:
    """The text a prompt asks to render: its quoted segments joined by ``sep``; None when there is none."""
    segs = extract_quoted_text(prompt)
    return sep.join(segs) if segs else None


def normalize_text(text: str) -> str:
    """NFKC-normalise, case-fold and remove all whitespace (the form OCR scores compare)."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return "".join(text.split())


def levenshtein(a: str, b: str) -> int:
    """Character-level edit distance (insert/delete/substitute, all cost 1). One CJK character = one step."""
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_accuracy(recognized: str, target: str, *, normalize: bool = True,
                  substring_match: bool = False) -> float | None:
    """``1 - min(lev(rec, target), len(target)) / len(target)``, in [0, 1]; None when the target is empty.

    Both strings are normalised with :func:`normalize_text` first (unless ``normalize=False``). With
    ``substring_match=True`` a target contained in the recognised text scores 1.0 (flow_grpo's rule, which
    forgives extra scene text).
    """
    if normalize:
        recognized, target = normalize_text(recognized), normalize_text(target)
    if not target:
        return None
    if substring_match and target in recognized:
        return 1.0
    dist = min(levenshtein(recognized, target), len(target))
    return 1.0 - dist / len(target)
