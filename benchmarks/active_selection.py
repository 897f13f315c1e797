"""Labels spent where they teach most? Preference-model accuracy against the number of labelled pairs, with the
pairs to label chosen at random or actively, on simulated raters whose ground truth is known.

    python benchmarks/active_selection.py [--seeds 3] [--budgets 20 40 80 120 160] [--step 20]

Set-up (CPU, seconds): the tiny random CLIP is the frozen backbone; candidates are synthetic noisy colour images,
four per prompt, every pair of a prompt a candidate pair (the pool); three simulated raters with noise 0.05, 0.1
and 0.2 vote for the redder image (ground truth: mean red - mean blue) and the majority is the label. Each seed
starts from the same random first ``--step`` labelled pairs for every strategy, then adds ``--step`` pairs per
round: ``random`` (a seeded sample), ``uncertain`` (the pool pairs the current head is least sure of) or
``disagree`` (where the head most disagrees with an automatic reward, here ``brightness``), re-training the head
each round. The metric is agreement with the ground truth on held-out prompts' pairs (not the raters' noisy
majority). The table prints the mean over seeds and a 95 % t-interval half-width.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from annotation.select import select_pairs  # noqa: E402
from rewards import brightness  # noqa: E402
from rewards.preference_model import PreferenceModel, fit_head  # noqa: E402
from rewards.testing import make_tiny_clip, redness, simulated_votes, synthetic_image  # noqa: E402

T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 8: 2.365, 10: 2.262}
STRATEGIES = ("random", "uncertain", "disagree")


def make_world(model: PreferenceModel, prompts: int, per_prompt: int, rng: random.Random,
               noise=(0.05, 0.1, 0.2)) -> dict:
    """Images, their features, ground truth and automatic reward; pairs with the raters' majority label."""
    images, prompt_of = [], []
    for p in range(prompts):
        for _ in range(per_prompt):
            images.append(synthetic_image(rng))
            prompt_of.append(f"a poster, colour study {p}")
    feats = model.features(prompt_of, images)
    truth = [redness(im) for im in images]
    auto = brightness(prompt_of, images)
    pairs = []
    for p in range(prompts):
        idx = range(p * per_prompt, (p + 1) * per_prompt)
        for a, b in itertools.combinations(idx, 2):
            votes = simulated_votes(truth[a], truth[b], rng, noise)
            majority_a = votes.count("left") * 2 > len(votes)
            pairs.append({"pair_id": f"{a}-{b}", "a": a, "b": b, "label_a": majority_a,
                          "truth_a": truth[a] > truth[b], "auto_margin": auto[a] - auto[b]})
    return {"feats": feats, "pairs": pairs}


def fit(world: dict, labelled: list[int], seed: int):
    import torch

    pairs, f = world["pairs"], world["feats"]
    win = torch.tensor([pairs[i]["a"] if pairs[i]["label_a"] else pairs[i]["b"] for i in labelled])
    lose = torch.tensor([pairs[i]["b"] if pairs[i]["label_a"] else pairs[i]["a"] for i in labelled])
    return fit_head(f[win], f[lose], seed=seed)


def truth_accuracy(head, world: dict) -> float:
    s = head.scores(world["feats"]).tolist()
    pairs = world["pairs"]
    return sum((s[p["a"]] > s[p["b"]]) == p["truth_a"] for p in pairs) / len(pairs)


def run_seed(model: PreferenceModel, seed: int, budgets: list[int], step: int, pool_prompts: int,
             test_prompts: int) -> dict[str, dict[int, float]]:
    rng = random.Random(seed)
    pool = make_world(model, pool_prompts, 4, rng)
    test = make_world(model, test_prompts, 4, rng)
    first = sorted(random.Random(1000 + seed).sample(range(len(pool["pairs"])), step))
    out: dict[str, dict[int, float]] = {}
    for strategy in STRATEGIES:
        labelled, acc = list(first), {}
        while True:
            head = fit(pool, labelled, seed)
            if len(labelled) in budgets:
                acc[len(labelled)] = truth_accuracy(head, test)
            if len(labelled) >= max(budgets):
                break
            rest = [i for i in range(len(pool["pairs"])) if i not in set(labelled)]
            cands = [pool["pairs"][i] for i in rest]
            s = head.scores(pool["feats"]).tolist()
            probs = [0.5 + 0.5 * math.tanh((s[c["a"]] - s[c["b"]]) / 2) for c in cands]
            pick = select_pairs(cands, step, strategy, probs=probs,
                                reward_margins=[c["auto_margin"] for c in cands], seed=seed * 100 + len(labelled))
            labelled += [rest[k] for k in pick]
        out[strategy] = acc
    return out


def _mean_ci(vals: list[float], signed: bool = False) -> str:
    half = T95.get(len(vals), 1.96) * statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):{'+' if signed else ''}.3f} ± {half:.3f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budgets", type=int, nargs="+", default=[20, 40, 80, 120, 160])
    ap.add_argument("--step", type=int, default=20, help="pairs labelled per round (and the random start)")
    ap.add_argument("--pool_prompts", type=int, default=60, help="prompts of the candidate pool (6 pairs each)")
    ap.add_argument("--test_prompts", type=int, default=40, help="held-out prompts (6 pairs each)")
    ap.add_argument("--backbone", help="a local CLIP-family folder (default: the tiny random CLIP, built here)")
    args = ap.parse_args(argv)
    if any(b % args.step for b in args.budgets):
        raise SystemExit("every budget must be a multiple of --step")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = PreferenceModel(args.backbone or make_tiny_clip(Path(tmp) / "clip", seed=0))
        runs = [run_seed(model, s, args.budgets, args.step, args.pool_prompts, args.test_prompts)
                for s in range(args.seeds)]
    print(f"pool: {args.pool_prompts * 6} pairs, test: {args.test_prompts * 6} pairs of held-out prompts; "
          f"{args.seeds} seeds; accuracy against the ground truth (mean ± 95 % t-interval half-width)")
    # The differences are paired by seed (same pool, same test set, same first pairs), so their interval is the
    # one that says whether a strategy beats random.
    active = STRATEGIES[1:]
    print("| labelled pairs | " + " | ".join(STRATEGIES) + " | " + " | ".join(f"{s} - random" for s in active) + " |")
    print("|---:|" + "---:|" * (len(STRATEGIES) + len(active)))
    for b in args.budgets:
        cells = [_mean_ci([r[s][b] for r in runs]) for s in STRATEGIES]
        cells += [_mean_ci([r[s][b] - r["random"][b] for r in runs], signed=True) for s in active]
        print(f"| {b} | " + " | ".join(cells) + " |")
    for strategy in STRATEGIES[1:]:
        diffs = [r[strategy][b] - r["random"][b] for r in runs for b in args.budgets]
        print(f"METRIC\t{strategy} - random, mean over budgets and seeds\t{statistics.mean(diffs):+.3f}")
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
