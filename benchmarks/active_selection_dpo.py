"""Labels chosen actively, measured where they end up: the DPO gain over SFT against the number of labelled pairs,
with the pairs sent to the raters chosen at random or by the preference model's uncertainty, on the demo's
workflow and its simulated rater panel.

    python benchmarks/active_selection_dpo.py [--seeds 3] [--budgets 16 32 64] [--seed_set 8] [--dpo_steps 60]
    python benchmarks/active_selection_dpo.py --no_heldout_prompts --first_seed 1 --seeds 1   # one seed per process

docs/annotation.md (section 8) has the table measured with ``--no_heldout_prompts`` and what it says.

Per workflow seed (0, 1, ...), the demo's own stages (``align.workflows.brand_adapter.run_workflow``, resumable)
give the brand data, the tiny model with its fitted VAE, the SFT adapter, its evaluation on the held-out seeds and
the candidate pool: 16 candidates per training prompt sampled from the SFT model, every pair of a prompt a
candidate pair, each labelled by the demo's three simulated raters (a pair they call a tie is dropped, as a pull
drops it: the label was spent and teaches nothing). Then, for every budget N (pairs sent to the raters):

- ``random``: ``--seed_set`` random pairs, then N - seed_set more at random;
- ``uncertain``: the same ``--seed_set`` random pairs train a Bradley-Terry preference head (the project's
  ``rewards.preference_model`` on the tiny random CLIP, the only backbone available offline), which picks the
  N - seed_set pool pairs it is least sure of (``annotation.select.select_pairs``);
- ``disagree`` (optional): where that head and the OCR reward disagree most.

Flow-DPO (the demo's ``recipes/demo/dpo_grpo.yaml`` with ``w_grpo`` 0: DPO with its KL to base + SFT, no GRPO)
trains from the SFT adapter on the labelled pairs among the N for ``--dpo_steps`` steps, and the demo's
evaluation scores it: OCR on the held-out seeds for the training prompts and the held-out prompts, gain over SFT
paired by prompt and seed. The table gives, per (strategy, budget), the mean gain over workflow seeds with its 95 %
t-interval, and the paired difference against random. Finished runs are skipped on a rerun (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall on shared cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 8: 2.365, 10: 2.262}
STRATEGIES = ("random", "uncertain", "disagree")
UPSTREAM = ("data", "base_model", "sft", "eval_sft", "pairs")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)  # a run killed while writing leaves no result that a rerun would trust


def mean_ci(vals: list[float]) -> tuple[float, float]:
    """Mean and 95 % t-interval half-width (0 for a single value)."""
    if len(vals) < 2:
        return statistics.mean(vals), 0.0
    return statistics.mean(vals), T95.get(len(vals), 1.96) * statistics.stdev(vals) / math.sqrt(len(vals))


def _cell(vals: list[float]) -> str:
    m, h = mean_ci(vals)
    return f"{m:+.3f} ± {h:.3f}"


def workflow_config(args: argparse.Namespace, seed: int) -> dict:
    from align.workflows.config import load_workflow_config

    cfg = load_workflow_config(args.config, fast=args.fast)
    cfg["seed"] = seed
    cfg["report_to"] = "none"  # dozens of short runs: no wandb folders
    if args.sft_steps:
        cfg["sft"]["args"] = {**(cfg["sft"].get("args") or {}), "max_steps": args.sft_steps}
    return cfg


def pool_and_labels(seed_dir: Path) -> tuple[list[dict], dict[str, dict], list[dict]]:
    """Every candidate pair (the pool), the raters' label per pair id (ties absent), and the candidates."""
    folder = seed_dir / "pairs"
    labels = {r["pair_id"]: r for r in _jsonl(folder / "metadata.jsonl")}
    return _jsonl(folder / "pairs.jsonl"), labels, _jsonl(folder / "candidates.jsonl")


def uncertainty_inputs(seed_dir: Path, pool: list[dict], labels: dict[str, dict], candidates: list[dict],
                       seed_set: list[int], seed: int) -> tuple[list[float], list[float], int]:
    """The preference head trained on the seed set's labelled pairs: P(a preferred) per pool pair, the OCR margin
    per pool pair (for ``disagree``), and how many labelled pairs the head saw."""
    from rewards.preference_model import PreferenceModel, fit_head
    from rewards.testing import make_tiny_clip

    folder = seed_dir / "pairs"
    clip = seed_dir / "tiny_clip"
    if not (clip / "config.json").is_file():
        make_tiny_clip(clip, seed=0)
    model = PreferenceModel(clip)
    row = {c["image"]: i for i, c in enumerate(candidates)}
    feats = model.features([c["prompt"] for c in candidates], [folder / c["image"] for c in candidates])
    seen = [labels[pool[i]["pair_id"]] for i in seed_set if pool[i]["pair_id"] in labels]
    if seen:
        head = fit_head(feats[[row[r["chosen"]] for r in seen]], feats[[row[r["rejected"]] for r in seen]], seed=seed)
        s = head.scores(feats).tolist()
        # sigmoid(r_a - r_b), written with tanh: no overflow for a confident head
        probs = [0.5 + 0.5 * math.tanh((s[row[p["image_a"]]] - s[row[p["image_b"]]]) / 2) for p in pool]
    else:  # every seed pair was a tie: the head knows nothing, every pair is equally uncertain
        probs = [0.5] * len(pool)
    score = {c["image"]: float(c.get("score") or 0.0) for c in candidates}
    margins = [score[p["image_a"]] - score[p["image_b"]] for p in pool]
    return probs, margins, len(seen)


def dpo_and_eval(cfg: dict, seed_dir: Path, run_dir: Path, rows: list[dict], steps: int,
                 heldout_prompts: bool = True) -> dict:
    """Flow-DPO from the SFT adapter on ``rows`` (the demo's DPO stage, GRPO off), then the demo's evaluation."""
    from align.workflows.brand_adapter import stage_dpo_grpo, stage_eval
    from align.workflows.sample_eval import evaluate_samples

    folder = (seed_dir / "pairs").resolve()
    with open(run_dir / "pairs.jsonl", "w", encoding="utf-8") as f:
        for r in rows:  # absolute image paths: the subset lives outside the pairs folder
            f.write(json.dumps({**r, "chosen": str(folder / r["chosen"]), "rejected": str(folder / r["rejected"])},
                               ensure_ascii=False) + "\n")
    dcfg = copy.deepcopy(cfg)
    dcfg["dpo_grpo"]["monitor"] = {}
    dcfg["dpo_grpo"]["kto"] = {"weight": 0.0}
    dcfg["dpo_grpo"]["args"] = {**(cfg["dpo_grpo"].get("args") or {}), "w_grpo": 0.0, "max_steps": steps,
                                "dataset_name": run_dir / "pairs.jsonl", "output_dir": run_dir / "dpo",
                                "run_name": f"active-{run_dir.name}", "logging_steps": max(1, steps // 4)}
    stage_dpo_grpo(dcfg, seed_dir.resolve())
    log = seed_dir / "dpo_grpo" / "train.log"
    if log.is_file():  # the stage logs into the workflow's own DPO folder: keep each run's log with the run
        os.replace(log, run_dir / "train.log")
    if heldout_prompts:
        return stage_eval(cfg, seed_dir.resolve(), str(run_dir.resolve().relative_to(seed_dir.resolve()) / "eval"),
                          run_dir / "dpo")
    # The training prompts only (half the evaluation's time): the same call the demo's stage makes, minus the
    # held-out prompt set.
    return evaluate_samples(seed_dir / "base_model" / "model", run_dir / "dpo", _jsonl(seed_dir / "data" / "prompts.jsonl"),
                            run_dir / "eval", {**cfg["eval"], "ocr": cfg.get("ocr") or {}}, int(cfg["size"]))


def gains(sft_eval: dict, after: dict | None) -> dict:
    """Mean OCR gain over SFT (training prompts, held-out prompts) with the demo's paired bootstrap interval."""
    from align.evaluation import bootstrap_gain

    out = {}
    for key, get in (("train", lambda e: e), ("heldout", lambda e: e.get("heldout"))):
        before = get(sft_eval)
        if not before or (after is not None and not get(after)):  # a set this run did not evaluate
            continue
        b = [p["ocr"] for p in before["per_prompt"]]
        # No labelled pair among the N: DPO has nothing to train on and the model stays the SFT model.
        a = [p["ocr"] for p in get(after)["per_prompt"]] if after is not None else b
        g = bootstrap_gain(b, a)["overall"]
        out[key] = {k: g[k] for k in ("gain", "low", "high", "before", "after")}
    return out


def run_seed(args: argparse.Namespace, seed: int) -> tuple[list[dict], dict | None]:
    """Every (budget, strategy) run of one workflow seed (finished ones skipped), and the preference head's record."""
    from align.workflows.brand_adapter import run_workflow
    from annotation.select import select_pairs

    cfg = workflow_config(args, seed)
    seed_dir = Path(args.out) / f"seed{seed}"
    up = run_workflow(cfg, seed_dir, only=UPSTREAM)
    pool, labels, candidates = pool_and_labels(seed_dir)
    sft_eval = json.loads((seed_dir / "eval_sft" / "scores.json").read_text(encoding="utf-8"))
    n_seed = min(args.seed_set, min(args.budgets))
    seed_set = select_pairs(pool, n_seed, "random", seed=seed)
    rest = [i for i in range(len(pool)) if i not in set(seed_set)]
    probs = margins = head = None
    head_pairs = 0
    if any(s != "random" for s in args.strategies):
        probs, margins, head_pairs = uncertainty_inputs(seed_dir, pool, labels, candidates, seed_set, seed)
        # How good the chooser is: agreement with the raters on the labelled pool pairs it was not trained on.
        held = [i for i, p in enumerate(pool) if p["pair_id"] in labels and i not in set(seed_set)]
        agree = [(probs[i] > 0.5) == (labels[pool[i]["pair_id"]]["chosen"] == pool[i]["image_a"]) for i in held]
        head_accuracy = sum(agree) / len(agree) if agree else None
        print(f"seed {seed}: preference head on {head_pairs} labelled seed pairs agrees with the raters on "
              f"{head_accuracy if head_accuracy is None else round(head_accuracy, 3)} of {len(held)} other labelled "
              f"pool pairs", flush=True)
        head = {"trained_on": head_pairs, "pool_accuracy": head_accuracy, "pool_pairs": len(pool),
                       "labelled_pool_pairs": len(labels)}
    records, by_key = [], {}
    # Budgets outer, in the order given: a cut-short run still has every strategy at the budgets it reached.
    for budget in args.budgets:
        for strategy in args.strategies:
            more = min(budget, len(pool)) - n_seed
            picked = []
            if more > 0:
                sub = [pool[i] for i in rest]
                picked = [rest[k] for k in select_pairs(
                    sub, more, strategy, seed=seed,
                    probs=None if probs is None else [probs[i] for i in rest],
                    reward_margins=None if margins is None else [margins[i] for i in rest])]
            chosen_ids = sorted(pool[i]["pair_id"] for i in seed_set + picked)
            rows = [labels[p] for p in chosen_ids if p in labels]
            key = hashlib.sha256(json.dumps({"upstream": {k: up[k]["inputs_key"] for k in UPSTREAM},
                                             "pairs": chosen_ids, "steps": args.dpo_steps,
                                             "heldout_prompts": not args.no_heldout_prompts},
                                            sort_keys=True).encode()).hexdigest()[:16]
            run_dir = seed_dir / "runs" / f"{strategy}_n{budget}"
            result_path = run_dir / "result.json"
            if result_path.is_file():
                done = json.loads(result_path.read_text(encoding="utf-8"))
                if done.get("key") == key:
                    print(f"seed {seed} {strategy} N={budget}: done before, skipped", flush=True)
                    records.append(done)
                    by_key.setdefault(key, {"gain": done["gain"], "run": run_dir.name})
                    continue
            run_dir.mkdir(parents=True, exist_ok=True)
            rec = {"key": key, "seed": seed, "strategy": strategy, "budget": budget, "sent": len(chosen_ids),
                   "labelled": len(rows), "seed_set": n_seed, "head_pairs": head_pairs if strategy != "random" else None,
                   "dpo_steps": args.dpo_steps}
            if key in by_key:  # the same pairs as another strategy's run (e.g. a budget equal to the seed set)
                rec.update(gain=by_key[key]["gain"], seconds=0.0, same_run_as=by_key[key]["run"])
            else:
                print(f"seed {seed} {strategy} N={budget}: {len(rows)} labelled of {len(chosen_ids)} sent ...",
                      flush=True)
                t0 = time.time()
                after = (dpo_and_eval(cfg, seed_dir, run_dir, rows, args.dpo_steps, not args.no_heldout_prompts)
                         if rows else None)
                rec.update(gain=gains(sft_eval, after), seconds=round(time.time() - t0, 1))
            _write_json(result_path, rec)
            g = rec["gain"]["train"]
            print(f"seed {seed} {strategy} N={budget}: gain {g['gain']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] "
                  f"({rec['seconds']:.0f} s)", flush=True)
            records.append(rec)
            by_key.setdefault(key, {"gain": rec["gain"], "run": run_dir.name})
    return records, head


def summarise(records: list[dict], strategies: list[str], budgets: list[int]) -> dict:
    """Per (strategy, budget): mean gain over seeds and its t-interval; per active strategy, the paired
    difference against random (same seed, same seed set, same budget)."""
    by = {(r["strategy"], r["budget"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    table = []
    for budget in budgets:
        for prompts in ("train", "heldout"):
            if not all(prompts in by[(s, budget, sd)]["gain"] for s in strategies for sd in seeds):
                continue
            row = {"budget": budget, "prompts": prompts, "n_seeds": len(seeds)}
            for s in strategies:
                vals = [by[(s, budget, sd)]["gain"][prompts]["gain"] for sd in seeds]
                m, h = mean_ci(vals)
                row[s] = {"mean": m, "half_width": h, "per_seed": vals,
                          "labelled": [by[(s, budget, sd)]["labelled"] for sd in seeds]}
            if "random" in strategies:
                for s in strategies:
                    if s == "random":
                        continue
                    diffs = [by[(s, budget, sd)]["gain"][prompts]["gain"] - by[("random", budget, sd)]["gain"][prompts]["gain"]
                             for sd in seeds]
                    m, h = mean_ci(diffs)
                    row[f"{s} - random"] = {"mean": m, "half_width": h, "per_seed": diffs}
            table.append(row)
    return {"seeds": seeds, "table": table}


def markdown(summary: dict, strategies: list[str]) -> str:
    active = [s for s in strategies if s != "random"] if "random" in strategies else []
    head = ["pairs sent", "prompts"] + [f"{s}: gain (labelled)" for s in strategies]
    head += [f"{s} - random" for s in active]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
    for row in summary["table"]:
        cells = [str(row["budget"]), "training" if row["prompts"] == "train" else "held-out"]
        for s in strategies:
            m, h, lab = row[s]["mean"], row[s]["half_width"], row[s]["labelled"]
            cells.append(f"{m:+.3f} ± {h:.3f} ({statistics.mean(lab):.0f})")
        cells += [f"{row[f'{s} - random']['mean']:+.3f} ± {row[f'{s} - random']['half_width']:.3f}" for s in active]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/active_selection_dpo", help="work folder; a rerun skips finished runs")
    ap.add_argument("--config", default="recipes/demo/brand_adapter.yaml", help="the demo's workflow YAML")
    ap.add_argument("--fast", action="store_true", help="the workflow's --fast settings (plumbing check, tests)")
    ap.add_argument("--seeds", type=int, default=3, help="how many workflow seeds: first_seed .. first_seed + N - 1")
    ap.add_argument("--first_seed", type=int, default=0, help="(several processes, one seed each, share --out)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64], help="pairs sent to the raters")
    ap.add_argument("--seed_set", type=int, default=8, help="random pairs every strategy starts from (the "
                    "preference head's training set)")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["random", "uncertain"])
    ap.add_argument("--dpo_steps", type=int, default=60, help="Flow-DPO steps per run, the same for every budget")
    ap.add_argument("--sft_steps", type=int, default=None, help="override the SFT stage's steps (default: the demo's)")
    ap.add_argument("--no_heldout_prompts", action="store_true",
                    help="score the training prompts only (half the evaluation time; DPO does not move the held-out "
                         "prompts on the tiny model)")
    ap.add_argument("--json", default=None, help="results JSON (default: <out>/results.json)")
    args = ap.parse_args(argv)
    if args.seed_set < 1 or min(args.budgets) < 1:
        ap.error("--seed_set and every budget must be at least 1")
    args.budgets = list(dict.fromkeys(args.budgets))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from align.demo import _quiet_progress_bars

    _quiet_progress_bars()
    t0 = time.time()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    records, heads = [], {}
    for seed in seeds:
        seed_records, heads[str(seed)] = run_seed(args, seed)
        records += seed_records
    summary = summarise(records, args.strategies, sorted(args.budgets))
    table = markdown(summary, args.strategies)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "runs": records, **summary,
              "preference_heads": heads,
              "markdown": table, "wall_seconds": round(time.time() - t0, 1)}
    json_path = Path(args.json or Path(args.out) / "results.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(json_path, result)
    print(f"\nDPO gain over SFT (OCR, held-out seeds), mean over {len(summary['seeds'])} workflow seeds ± 95 % "
          f"t-interval half-width; (n): mean labelled pairs of those sent; {args.dpo_steps} DPO steps")
    print(table)
    for row in summary["table"]:
        for s in args.strategies:
            if s != "random" and "random" in args.strategies:
                print(f"METRIC\t{s} - random, {row['budget']} pairs, {row['prompts']} prompts\t"
                      f"{row[f'{s} - random']['mean']:+.3f}")
    print(f"results: {json_path}\nwall time {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
