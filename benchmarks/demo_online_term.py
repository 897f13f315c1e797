"""The online term's own contribution on the main job, pooled over workflow seeds.

For each workflow seed, the demo (``qwen-image-demo --seed S``) runs as configured (``on``); then a copy of that run
re-runs only its alignment stage and evaluation with the online term's weight set to 0 (``off``: the same SFT
adapter, the same pairs, the same DPO and KL terms). The evaluation scores every stage on the same held-out seeds, so
``on - off`` is paired per (workflow seed, prompt, evaluation seed); the pooled interval is a bootstrap over the
(workflow seed, evaluation seed) columns: 3 workflow seeds x 16 evaluation seeds = 48 per prompt.

A single seed's table is not a result: 1500 SFT steps amplify float rounding, so SFT's starting point differs
between machines and seeds; the pooled interval is what to quote, with the machine.

    python benchmarks/demo_online_term.py --seeds 0 1 2 --out outputs/online-term
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIG = ROOT / "recipes/demo/brand_adapter.yaml"


def _scores(run: Path, stage: str, split: str = "train") -> tuple[list[str], np.ndarray]:
    data = json.loads((run / stage / "scores.json").read_text())
    rows = data["per_prompt"] if split == "train" else data.get("heldout", {}).get("per_prompt", [])
    return [r["prompt"] for r in rows], np.asarray([r["ocr"] for r in rows], dtype=np.float64)


def _demo(out: Path, seed: int, config: Path) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "align.demo", "--output_dir", str(out), "--seed", str(seed), "--config", str(config)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"demo failed ({out}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def off_config(config: Path, weight_option: str, dest: Path) -> Path:
    """The workflow config with only the alignment stage changed: the online weight 0 and no held-out monitor (it
    evaluates the online term; it does not change the training trajectory). Every other stage keeps its inputs, so
    the copied run re-uses them."""
    cfg = yaml.safe_load(config.read_text())
    stage = cfg["dpo_grpo"]
    stage["args"] = {**(stage.get("args") or {}), weight_option: 0.0}
    stage["monitor"] = {}
    dest.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    return dest


def pooled(on: list[np.ndarray], off: list[np.ndarray]) -> dict:
    from align.evaluation import bootstrap_gain

    return bootstrap_gain(np.concatenate(off, axis=1), np.concatenate(on, axis=1))


def rescore_fresh(run: Path, offset: int) -> Path:
    """Score a finished run's aligned adapter again on ``eval.seeds`` seeds starting at ``offset`` (no retraining):
    seeds that played no part in choosing the configuration. Returns the folder (``eval_aligned_seeds<offset>``)."""
    from align.workflows.brand_adapter import stage_eval

    dest = run / f"eval_aligned_seeds{offset}"
    if not (dest / "scores.json").is_file():
        cfg = json.loads((run / "workflow_config.json").read_text())
        stage_eval({**cfg, "eval": {**cfg["eval"], "seed_offset": offset}}, run, dest.name, run / "dpo_grpo")
    return dest


def gain_table(rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> tuple[list[str], dict, dict]:
    """Markdown rows per workflow seed (SFT, off, on, gain) and the pooled row; the per-seed and pooled numbers."""
    lines, per_seed, on, off = [], {}, [], []
    for seed, s_sft, s_off, s_on in rows:
        on.append(s_on)
        off.append(s_off)
        one = pooled([s_on], [s_off])["overall"]
        per_seed[seed] = {"sft": float(s_sft.mean()), "off": float(s_off.mean()), "on": float(s_on.mean()), **one}
        lines.append(f"| {seed} | {s_sft.mean():.3f} | {s_off.mean():.3f} | {s_on.mean():.3f} | "
                     f"{one['gain']:+.3f} [{one['low']:+.3f}, {one['high']:+.3f}] |")
    total = pooled(on, off)["overall"]
    table = ["| workflow seed | OCR after SFT | after the stage, online weight 0 | after the stage | online term's "
             "gain [95 %] |", "|---|---|---|---|---|", *lines,
             f"| pooled ({len(rows)} seeds x {on[0].shape[1]} eval seeds x {on[0].shape[0]} prompts) | "
             f"{np.mean([v['sft'] for v in per_seed.values()]):.3f} | {total['before']:.3f} | {total['after']:.3f} | "
             f"**{total['gain']:+.3f} [{total['low']:+.3f}, {total['high']:+.3f}]** |"]
    return table, per_seed, total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("outputs/online-term"))
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the workflow YAML (default: the demo's)")
    ap.add_argument("--weight_option", default="w_online", help="the online term's weight in the alignment recipe")
    ap.add_argument("--fresh_seed_offset", type=int, default=None,
                    help="also score both adapters on as many evaluation seeds from this offset (e.g. 5000): seeds "
                         "no configuration choice looked at, to check a result picked among several variants")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, fresh_rows = [], []
    for seed in args.seeds:
        run_on, run_off = args.out / f"seed{seed}-on", args.out / f"seed{seed}-off"
        if not (run_on / "eval_aligned" / "scores.json").is_file():
            print(f"seed {seed}: demo ({run_on}) ...", flush=True)
            print(f"  {_demo(run_on, seed, args.config):.0f} s", flush=True)
        if not (run_off / "eval_aligned" / "scores.json").is_file():
            if not run_off.exists():
                shutil.copytree(run_on, run_off, ignore=shutil.ignore_patterns("wandb"))
            cfg = off_config(args.config, args.weight_option, args.out / f"seed{seed}-off.yaml")
            print(f"seed {seed}: the same run with {args.weight_option} 0 ({run_off}) ...", flush=True)
            print(f"  {_demo(run_off, seed, cfg):.0f} s", flush=True)
        _, s_sft = _scores(run_on, "eval_sft")
        rows.append((seed, s_sft, _scores(run_off, "eval_aligned")[1], _scores(run_on, "eval_aligned")[1]))
        if args.fresh_seed_offset is not None:
            print(f"seed {seed}: both adapters on seeds from {args.fresh_seed_offset} ...", flush=True)
            fresh = [_scores(run, rescore_fresh(run, args.fresh_seed_offset).name)[1] for run in (run_off, run_on)]
            fresh_rows.append((seed, s_sft, *fresh))
    table, per_seed, total = gain_table(rows)
    result = {"per_seed": per_seed, "pooled": total}
    if fresh_rows:
        fresh_table, fresh_per_seed, fresh_total = gain_table(fresh_rows)
        table += ["", f"Fresh evaluation seeds from {args.fresh_seed_offset} (the SFT column keeps the workflow's "
                  "seeds):", "", *fresh_table]
        result["fresh"] = {"seed_offset": args.fresh_seed_offset, "per_seed": fresh_per_seed, "pooled": fresh_total}
    print("\n".join(table))
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    (args.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
