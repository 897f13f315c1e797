"""Label generate-pairs output automatically: simulated raters who prefer the higher reward (the demo's stand-in
for the Label Studio step). Writes ``metadata.jsonl`` (prompt, chosen, rejected, votes, agreement) next to
``pairs.jsonl``, the format ``align/dpo.py`` reads and ``qwen-image-annotation pull`` writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image


def contrast(path: Path) -> float:
    """Grey-level standard deviation in [0, 1]: legible text on a clean background has more of it than mush."""
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float32).std() / 128.0)


def label_pairs(folder: Path, raters: int = 3, noise: float = 0.05, seed: int = 0) -> dict:
    """Each simulated rater scores both images (reward + Gaussian noise; contrast breaks exact ties, e.g. when OCR
    reads nothing in either) and votes; the majority side becomes ``chosen``."""
    rng = random.Random(seed)
    cands = {c["image"]: c for c in map(json.loads, (folder / "candidates.jsonl").read_text(encoding="utf-8").splitlines())}
    rows, ties = [], 0
    for line in (folder / "pairs.jsonl").read_text(encoding="utf-8").splitlines():
        pair = json.loads(line)
        a, b = pair["image_a"], pair["image_b"]
        score = {k: float(cands[k].get("score", 0.0)) + 0.1 * contrast(folder / k) for k in (a, b)}
        votes_a = votes_b = 0
        for _ in range(raters):
            sa, sb = score[a] + rng.gauss(0, noise), score[b] + rng.gauss(0, noise)
            votes_a += sa > sb
            votes_b += sb > sa  # equal scores: the rater abstains (no side wins by position)
        if votes_a == votes_b:
            ties += 1
            continue
        chosen, rejected = (a, b) if votes_a > votes_b else (b, a)
        rows.append({"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected,
                     "votes": [max(votes_a, votes_b), min(votes_a, votes_b)],
                     "agreement": max(votes_a, votes_b) / (votes_a + votes_b), "pair_id": pair["pair_id"]})
    if not rows:
        raise ValueError(f"no labelled pairs in {folder}: every pair was a tie")
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    unanimous = sum(1 for r in rows if r["agreement"] == 1.0)
    return {"labelled_pairs": len(rows), "ties_dropped": ties, "unanimous": unanimous,
            "preferences": str(folder / "metadata.jsonl")}
