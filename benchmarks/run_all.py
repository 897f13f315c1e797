"""Run every performance script in benchmarks/ and print one table of their numbers.

    python benchmarks/run_all.py                 # all scripts, default (CPU-sized) settings
    python benchmarks/run_all.py --only sft grpo # a subset (matched against the script names)

Each script prints its own detailed table and, for this runner, lines ``METRIC<TAB>name<TAB>value<TAB>unit``.
gpu_scale.py measures the real 20B config only where a GPU is present and skips cleanly elsewhere.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["sft_step.py", "edit_step.py", "dpo_reference.py", "grpo_step.py", "grpo_memory.py", "rewards_speed.py", "gpu_scale.py"]


def run(script: str) -> tuple[int, float, list[tuple[str, str, str]], str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True)
    metrics = []
    for line in proc.stdout.splitlines():
        if line.startswith("METRIC\t"):
            _, name, value, unit = (line.split("\t") + ["", "", ""])[:4]
            metrics.append((name, value, unit))
    return proc.returncode, time.perf_counter() - t, metrics, proc.stdout + proc.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of script names to run")
    ap.add_argument("--verbose", action="store_true", help="also print each script's own output")
    args = ap.parse_args(argv)
    scripts = [s for s in SCRIPTS if not args.only or any(o in s for o in args.only)]
    rows, failed = [], []
    for script in scripts:
        print(f"running {script} ...", flush=True)
        code, seconds, metrics, output = run(script)
        if args.verbose or code != 0:
            print(output)
        if code != 0:
            failed.append(script)
        rows += [(script, *m) for m in metrics] or [(script, "(no numbers: see its output)", "", "")]
        rows.append((script, "wall time of the script", f"{seconds:.1f}", "s"))
    w = max(len(r[1]) for r in rows) + 2
    print(f"\n{'script':<20}{'measurement':<{w}}{'value':>12}  unit")
    for script, name, value, unit in rows:
        print(f"{script:<20}{name:<{w}}{value:>12}  {unit}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
