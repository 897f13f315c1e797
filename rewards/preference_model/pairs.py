"""Raters' pairs: reading a pulled pairs folder (or a JSONL file), the held-out split, and the held-out metrics
(accuracy against the majority, and per rater with its ceiling). Pure Python: no torch here."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from qwen_image.errors import UserError
from qwen_image.jsonl import read_jsonl_objects

__all__ = ["PairRecord", "read_pairs", "split_pairs", "evaluate_pairs", "CHOICES"]

CHOICES = ("chosen", "rejected", "both_bad")


@dataclass
class PairRecord:
    """One labelled pair. ``target`` is P(chosen beats rejected) for the loss: 1.0, or 0.5 for a tie."""

    prompt: str
    chosen: Any                      # a path or an image
    rejected: Any
    target: float = 1.0
    pair_id: str = ""
    rater_choices: dict[str, str] = field(default_factory=dict)   # rater -> "chosen" | "rejected" | "both_bad"


# ----------------------------------------------------------------------------------------------------- reading pairs

def _outcome(row: dict) -> str:
    """"chosen" (chosen won), "tie", "both_bad" or "rejected" (the votes favour the rejected image)."""
    outcome = str(row.get("outcome") or "chosen").strip().lower()
    if outcome not in ("chosen", "tie", "both_bad"):
        raise ValueError(f"outcome {outcome!r} is not chosen, tie or both_bad")
    if outcome != "chosen":
        return outcome
    votes = row.get("votes")
    if isinstance(votes, (list, tuple)) and len(votes) == 2 and all(isinstance(v, (int, float)) for v in votes):
        if votes[0] == votes[1]:
            return "tie"
        if votes[1] > votes[0]:
            return "rejected"
    return "chosen"


def _rater_choices(row: dict, where: str) -> dict[str, str]:
    raters, choices = row.get("raters"), row.get("rater_choices")
    if raters is None and choices is None:
        return {}
    if not isinstance(raters, list) or not isinstance(choices, list) or len(raters) != len(choices):
        raise UserError(f"{where}: 'raters' and 'rater_choices' must be lists of the same length")
    bad = [c for c in choices if c not in CHOICES]
    if bad:
        raise UserError(f"{where}: rater choice {bad[0]!r} is not one of {', '.join(CHOICES)}")
    return {str(r): str(c) for r, c in zip(raters, choices)}


def read_pairs(source: str | os.PathLike, *, ties: str = "half") -> tuple[list[PairRecord], dict]:
    """Labelled pairs from a pulled pairs folder (its ``metadata.jsonl``) or a ``.jsonl`` file, and counts.

    Ties become 0.5 targets (``ties="half"``) or are dropped (``"drop"``); "both bad" rows and rows whose votes
    favour the rejected image are dropped. A pull has already dropped its ties and "both bad" majorities: their
    numbers are taken from the folder's ``summary.json`` (``dropped_at_pull``). Bad input is a one-line UserError.
    """
    if ties not in ("half", "drop"):
        raise UserError(f"ties must be 'half' or 'drop', got {ties!r}")
    src = Path(os.path.expanduser(str(source)))
    if not src.exists():
        raise UserError(f"--pairs {src} does not exist (a pulled pairs folder or a .jsonl file)")
    meta = src / "metadata.jsonl" if src.is_dir() else src
    if not meta.is_file():
        raise UserError(f"--pairs {src}: no metadata.jsonl in it (pull a pairs project with "
                        f"`qwen-image-annotation pull`, or give a .jsonl file)")
    rows = read_jsonl_objects(meta, " with prompt, chosen, rejected")
    if not rows:
        raise UserError(f"{meta} has no rows")
    counts = Counter()
    pairs = []
    for n, row in enumerate(rows, 1):
        where = f"{meta}:{n}"
        missing = [k for k in ("prompt", "chosen", "rejected") if not row.get(k)]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)} (each row needs prompt, chosen, rejected)")
        try:
            outcome = _outcome(row)
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
        if outcome == "both_bad":
            counts["both_bad_dropped"] += 1
            continue
        if outcome == "rejected":
            counts["favour_rejected_dropped"] += 1
            continue
        if outcome == "tie" and ties == "drop":
            counts["ties_dropped"] += 1
            continue
        images = {}
        for side in ("chosen", "rejected"):
            path = Path(str(row[side])).expanduser()
            path = path if path.is_absolute() else meta.parent / path
            if not path.is_file():
                raise UserError(f"{where}: {side} image {path} does not exist")
            images[side] = path.resolve()
        counts["ties_half" if outcome == "tie" else "pairs"] += 1
        pairs.append(PairRecord(prompt=str(row["prompt"]), chosen=images["chosen"], rejected=images["rejected"],
                                target=0.5 if outcome == "tie" else 1.0,
                                pair_id=str(row.get("pair_id") or f"row{n}"),
                                rater_choices=_rater_choices(row, where)))
    report = {"rows": len(rows), "used": len(pairs), **{k: counts.get(k, 0) for k in
              ("pairs", "ties_half", "ties_dropped", "both_bad_dropped", "favour_rejected_dropped")}}
    summary = meta.parent / "summary.json"
    if src.is_dir() and summary.is_file():
        try:
            outcomes = json.loads(summary.read_text(encoding="utf-8")).get("outcomes") or {}
        except json.JSONDecodeError:
            outcomes = {}
        report["dropped_at_pull"] = {k: outcomes[k] for k in ("ties", "both_bad", "no_majority", "too_few_votes")
                                     if k in outcomes}
    if not pairs:
        raise UserError(f"no usable pairs in {meta}: {report}")
    return pairs, report


def split_pairs(pairs: Sequence[PairRecord], heldout_fraction: float = 0.2, seed: int = 0,
                by: str = "prompt") -> tuple[list[int], list[int], str]:
    """Seeded (train indices, held-out indices, how) split. ``by="prompt"`` holds out whole prompts; with fewer
    than two prompts it falls back to a split by pair (and says so in ``how``)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise UserError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if by not in ("prompt", "pair"):
        raise UserError(f"split must be 'prompt' or 'pair', got {by!r}")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.prompt if by == "prompt" else str(i), []).append(i)
    if by == "prompt" and len(groups) < 2:
        return (*split_pairs(pairs, heldout_fraction, seed, "pair")[:2], "pair (only one prompt)")
    keys = sorted(groups)
    rng.shuffle(keys)
    n_held = min(len(keys) - 1, max(1, round(heldout_fraction * len(keys))))
    held = sorted(i for k in keys[:n_held] for i in groups[k])
    train = sorted(i for k in keys[n_held:] for i in groups[k])
    return train, held, by


# --------------------------------------------------------------------------------------------------------- metrics

def _others_majority(choices: dict[str, str], rater: str) -> str | None:
    c = Counter(v for r, v in choices.items() if r != rater and v in ("chosen", "rejected"))
    if c["chosen"] == c["rejected"]:
        return None
    return "chosen" if c["chosen"] > c["rejected"] else "rejected"


def evaluate_pairs(pairs: Sequence[PairRecord], margins: Sequence[float]) -> dict:
    """Held-out metrics from the model's ``margins`` (``r(chosen) - r(rejected)`` per pair).

    - ``accuracy``: how often the model prefers the raters' majority (pairs with target 1; ties excluded).
    - ``per_rater``: for each rater with a chosen/rejected vote, ``model_vs_rater`` (the model agrees with that
      rater), ``rater_vs_others`` (that rater agrees with the majority of the other raters: the ceiling, how well
      one person predicts the panel) and ``model_vs_others`` (the model on the same pairs, same reference).
    """
    decided = [(p, m) for p, m in zip(pairs, margins) if p.target == 1.0]
    acc = sum(m > 0 for _, m in decided) / len(decided) if decided else None
    per: dict[str, Counter] = {}
    for p, m in decided:
        model = "chosen" if m > 0 else "rejected"
        for rater, vote in p.rater_choices.items():
            if vote not in ("chosen", "rejected"):
                continue
            c = per.setdefault(rater, Counter())
            c["n"] += 1
            c["model_vs_rater"] += model == vote
            others = _others_majority(p.rater_choices, rater)
            if others is not None:
                c["n_others"] += 1
                c["rater_vs_others"] += vote == others
                c["model_vs_others"] += model == others
    per_rater = {
        r: {"n": c["n"], "model_vs_rater": c["model_vs_rater"] / c["n"],
            "n_others": c["n_others"],
            "rater_vs_others": c["rater_vs_others"] / c["n_others"] if c["n_others"] else None,
            "model_vs_others": c["model_vs_others"] / c["n_others"] if c["n_others"] else None}
        for r, c in sorted(per.items())}
    return {"accuracy": acc, "n": len(decided), "ties": len(pairs) - len(decided), "per_rater": per_rater}


