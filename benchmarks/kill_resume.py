"""kill -9 at random moments of SFT, DPO and GRPO runs that save every step; each time the run is restarted with
``--resume_from_checkpoint last`` (a fresh start while no complete checkpoint exists) until it finishes, and the
final weights are compared with an uninterrupted run.

    python benchmarks/kill_resume.py                 # tiny random model, CPU: 7 kills per trainer (21)
    python benchmarks/kill_resume.py --kills 4 --trainers sft dpo

Half the kills hit a checkpoint save in progress, half land at a random moment of the training left.
Prints one row per trainer: kills, kills that landed during a checkpoint save (a staging folder was left),
restarts that resumed from a checkpoint, final step, max |weight difference| to the uninterrupted run. Not a
test: the kill moments are random (seeded), the table is what it shows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.launch import last_complete_checkpoint  # noqa: E402
from align.trainers.base import STAGING_PREFIX  # noqa: E402

RECIPES = {"sft": ("align/sft.py", "recipes/tiny/sft_lora.yaml"), "dpo": ("align/dpo.py", "recipes/tiny/dpo_lora.yaml"),
           "grpo": ("align/grpo.py", "recipes/tiny/grpo_brightness.yaml")}


def write_data(root: Path) -> dict[str, list[str]]:
    import numpy as np
    from PIL import Image

    from align.data.preference import write_synthetic_pairs

    sft = root / "sft"
    sft.mkdir(parents=True)
    with open(sft / "metadata.jsonl", "w") as fh:
        for i in range(6):
            Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)).save(sft / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "prompt": f"a sign {i}", "ratings": [5, 5, 5]}) + "\n")
    pairs = write_synthetic_pairs(root / "pairs", n=8, size=32)
    return {
        "sft": ["--dataset_name", str(sft), "--caption_dropout", "0", "--aspect_ratio_buckets", "false",
                "--validation_prompts", "[]", "--per_device_train_batch_size", "2"],
        "dpo": ["--dataset_name", str(pairs), "--eval_fraction", "0", "--eval_strategy", "no"],
        "grpo": ["--num_inference_steps", "2", "--finetune", "lora", "--lora_rank", "4", "--lora_alpha", "4",
                 "--learning_rate", "1e-3"],
    }


def command(trainer: str, out: Path, steps: int, extra: list[str], cache: Path) -> list[str]:
    script, recipe = RECIPES[trainer]
    cached = ["--cache_dir", str(cache)] if trainer != "grpo" else []  # online runs encode prompts as they go
    return [sys.executable, str(ROOT / script), "--config", str(ROOT / recipe), "--output_dir", str(out), *cached,
            "--max_steps", str(steps), "--save_strategy", "steps", "--save_steps", "1",
            "--logging_steps", "1", "--report_to", "none", "--seed", "0", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    files = [out / "pytorch_lora_weights.safetensors"] if (out / "pytorch_lora_weights.safetensors").is_file() \
        else sorted((out / "transformer").glob("*.safetensors"))
    state: dict = {}
    for f in files:
        state.update(load_file(f))
    return state


def max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _saves(out: Path) -> set[str]:
    return {p.name for p in out.glob("*checkpoint-*")} if out.is_dir() else set()


def run_with_kills(trainer: str, base: list[str], out: Path, kills: int, window: float, steps: int,
                   rng: random.Random, log: Path) -> dict:
    """Restart until the run finishes; the first ``kills`` attempts are killed: odd ones the moment a checkpoint
    save is in progress (a staging folder exists), even ones at a random moment of the training that is left
    (uniform over the uninterrupted run's remaining training time, counted from the attempt's first save, so the
    ~1 min of imports and caching does not absorb the kills)."""
    stats = {"kills": 0, "mid_save": 0, "resumed": 0, "failures": 0}
    while True:
        resume = last_complete_checkpoint(out) if out.is_dir() else None
        cmd = list(base) + (["--resume_from_checkpoint", "last"] if resume else [])
        if resume:
            stats["resumed"] += 1
        done = int(resume.name.split("-")[1]) if resume else 0
        before = _saves(out)
        with open(log, "a") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
            if stats["kills"] < kills:
                during_save = stats["kills"] % 2 == 0
                while proc.poll() is None:
                    new = _saves(out) - before
                    # a save in progress; or, if saves are too quick to catch, the second new checkpoint
                    if new and (not during_save or any(n.startswith(STAGING_PREFIX) for n in new) or len(new) > 1):
                        break
                    time.sleep(0.005)
                if not during_save:
                    deadline = time.monotonic() + rng.uniform(0.0, 0.9) * window * (steps - done - 1) / steps
                    while proc.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.01)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    stats["kills"] += 1
                    stats["mid_save"] += int(any(p.name.startswith(STAGING_PREFIX) for p in out.glob("*")))
                    continue
            code = proc.wait()
        if code == 0:
            return stats
        stats["failures"] += 1
        if stats["failures"] > 3:
            raise SystemExit(f"{trainer}: the restarted run failed {stats['failures']} times; see {log}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainers", nargs="+", default=["sft", "dpo", "grpo"], choices=list(RECIPES))
    p.add_argument("--kills", type=int, default=7, help="kills per trainer (default 7: 21 in all)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kill_resume_"))
    extras = write_data(root / "data")
    rows = []
    for trainer in args.trainers:
        cache = root / trainer / "cache"
        ref_out, kill_out = root / trainer / "uninterrupted", root / trainer / "killed"
        log = root / trainer / "log.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(log, "a") as fh:
            ref = subprocess.run(command(trainer, ref_out, args.steps, extras[trainer], cache), stdout=fh,
                                 stderr=subprocess.STDOUT, env=env())
        duration = time.monotonic() - t0
        if ref.returncode != 0:
            raise SystemExit(f"{trainer}: the uninterrupted run failed; see {log}")
        # Training window: from the first checkpoint to the final trainer state (plus one step before it).
        first = (ref_out / "checkpoint-1").stat().st_mtime
        window = ((ref_out / "trainer_state.json").stat().st_mtime - first) * (1 + 1 / max(1, args.steps - 1))
        # Rounds of killed runs until the kills add up (a run can finish before its share of kills); every round
        # is compared with the uninterrupted run.
        total = {"kills": 0, "mid_save": 0, "resumed": 0, "failures": 0, "rounds": 0}
        diff, step = 0.0, None
        reference = final_weights(ref_out)
        while total["kills"] < args.kills:
            out = kill_out / f"round{total['rounds']}"
            stats = run_with_kills(trainer, command(trainer, out, args.steps, extras[trainer], cache), out,
                                   args.kills - total["kills"], window, args.steps, rng, log)
            total = {k: total[k] + stats.get(k, 0) for k in total} | {"rounds": total["rounds"] + 1}
            state = json.loads((out / "trainer_state.json").read_text())
            step = state["global_step"] if step is None else min(step, state["global_step"])
            diff = max(diff, max_diff(reference, final_weights(out)))
        rows.append((trainer, total, step, diff, duration))
        print(f"{trainer}: done ({total['kills']} kills in {total['rounds']} killed runs)", flush=True)
    print(f"\n{'trainer':8} {'runs':>4} {'kills':>5} {'mid-save':>8} {'resumes':>7} {'final step':>10} "
          f"{'max |dw|':>10} {'equal':>5} {'run s':>6}")
    for trainer, stats, step, diff, duration in rows:
        print(f"{trainer:8} {stats['rounds']:4d} {stats['kills']:5d} {stats['mid_save']:8d} {stats['resumed']:7d} "
              f"{step:10d} {diff:10.2e} {str(diff == 0.0):>5} {duration:6.1f}")
    print(f"METRIC\tkills_total\t{sum(r[1]['kills'] for r in rows)}")
    print(f"(runs in {root})")


if __name__ == "__main__":
    main()
