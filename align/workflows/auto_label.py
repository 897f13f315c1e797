"""Label generate-pairs output automatically: simulated raters who prefer the higher reward (the demo's stand-in
for the Label Studio step). Writes ``metadata.jsonl`` (prompt, chosen, rejected, votes, agreement) next to
``pairs.jsonl``, the format ``align/dpo.py`` reads and ``qwen-image-annotation pull`` writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def rater_votes(score_a: float, score_b: float, rng: random.Random, raters: int = 3, noise: float = 0.05,
                tie_margin: float = 0.1) -> tuple[int, int]:
    """Votes for (a, b) from ``raters`` simulated raters. Each sees both scores plus Gaussian noise and votes only
    when the difference it sees exceeds ``tie_margin``; otherwise it abstains, as a person shown two equally
    unreadable signs does. Without that, pairs of two zero-OCR images would be decided by noise and teach DPO
    nothing but noise."""
    votes_a = votes_b = 0
    for _ in range(raters):
        diff = (score_a + rng.gauss(0, noise)) - (score_b + rng.gauss(0, noise))
        votes_a += diff > tie_margin
        votes_b += diff < -tie_margin
    return votes_a, votes_b


def label_pairs(folder: Path, raters: int = 3, noise: float = 0.05, seed: int = 0, tie_margin: float = 0.1) -> dict:
    """Label every pair of ``pairs.jsonl`` with :func:`rater_votes`. A side needs a strict majority of all raters
    (2 of 3); anything else is a tie and the pair is dropped."""
    rng = random.Random(seed)
    cands = {c["image"]: c for c in map(json.loads, (folder / "candidates.jsonl").read_text(encoding="utf-8").splitlines())}
    rows, ties = [], 0
    for line in (folder / "pairs.jsonl").read_text(encoding="utf-8").splitlines():
        pair = json.loads(line)
        a, b = pair["image_a"], pair["image_b"]
        votes_a, votes_b = rater_votes(float(cands[a].get("score", 0.0)), float(cands[b].get("score", 0.0)), rng,
                                       raters, noise, tie_margin)
        if max(votes_a, votes_b) * 2 <= raters:
            ties += 1
            continue
        chosen, rejected = (a, b) if votes_a > votes_b else (b, a)
        rows.append({"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected,
                     "votes": [max(votes_a, votes_b), min(votes_a, votes_b)],
                     "agreement": max(votes_a, votes_b) / raters, "pair_id": pair["pair_id"]})
    if not rows:
        raise ValueError(f"no labelled pairs in {folder}: the raters saw no difference in any pair (every candidate "
                         f"scored within tie_margin={tie_margin} of its partner); train SFT longer or lower "
                         f"pairs.tie_margin")
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    unanimous = sum(1 for r in rows if r["agreement"] == 1.0)
    return {"labelled_pairs": len(rows), "ties_dropped": ties, "unanimous": unanimous,
            "preferences": str(folder / "metadata.jsonl")}


def simulated_ratings(score: float, rng: random.Random, raters: int = 3, noise: float = 0.05) -> list[int]:
    """1-5 ratings of one image from ``raters`` simulated raters: each sees the reward (in [0, 1]) plus Gaussian
    noise and maps it linearly onto the five stars (0 -> 1 star, 1 -> 5 stars)."""
    return [min(5, max(1, round(1 + 4 * (score + rng.gauss(0.0, noise))))) for _ in range(raters)]


def rate_candidates(folder: Path, out: Path, raters: int = 3, noise: float = 0.05, seed: int = 0) -> dict:
    """The rating round: every candidate of ``candidates.jsonl`` rated by the simulated panel, written as a rating
    project's pull would be (an imagefolder whose ``metadata.jsonl`` rows carry ``prompt`` and ``ratings``), for
    Diffusion-KTO (``w_kto`` with ``kto_dataset_name``). Its own random stream: the pair labels do not change."""
    import shutil

    rng = random.Random(f"ratings-{seed}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for line in (folder / "candidates.jsonl").read_text(encoding="utf-8").splitlines():
        cand = json.loads(line)
        name = Path(cand["image"]).name
        shutil.copyfile(folder / cand["image"], out / name)
        rows.append({"file_name": name, "prompt": cand["prompt"],
                     "ratings": simulated_ratings(float(cand.get("score", 0.0)), rng, raters, noise)})
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    means = [sum(r["ratings"]) / len(r["ratings"]) for r in rows]
    return {"rated_images": len(rows), "rated_high": sum(m >= 4.5 for m in means),
            "rated_low": sum(m <= 2.0 for m in means), "ratings": str(out)}
