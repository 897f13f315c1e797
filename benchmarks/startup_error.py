"""Seconds from typing a command to its one-line error, for mistakes found before the model loads, and the library
warning lines printed on the way. Run under ``nice -n 19`` on a shared machine; the numbers are the median of
``--repeat`` runs: wall seconds, and CPU seconds (user + sys of every process the command started), which a busy
machine inflates much less than the wall time.

    python benchmarks/startup_error.py [--repo PATH] [--repeat 3]

``--repo`` measures another checkout of the project (e.g. an older commit) with the same commands.

Cases: a bad option value (``qwen-image-align`` finds it itself, in its own process), a data mistake (found in the
training process that ``qwen-image-align`` starts through ``accelerate launch``: the launcher imports what its
checks use, without peft / diffusers / bitsandbytes, and the training process imports the whole stack), the same
data mistake with the training script run directly (one process), and the import of a config class alone outside
the launcher (transformers then imports peft with ``TrainingArguments``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _data(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "prompt": "a sign", "ratings": [5, "five", 5]} for i in range(2)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    repo = Path(args.repo).resolve()
    recipe = str(repo / "recipes/tiny/sft_lora.yaml")
    env = {**os.environ, "PYTHONPATH": str(repo), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(_data(Path(tmp) / "five"))
        out = str(Path(tmp) / "out")
        cases = {
            "bad option value, qwen-image-align (1 process)":
                [sys.executable, "-m", "align.cli", "sft", "--config", recipe, "--learning_rate", "fast"],
            "data mistake, qwen-image-align (launcher + training process)":
                [sys.executable, "-m", "align.cli", "sft", "--config", recipe, "--dataset_name", data,
                 "--output_dir", out],
            "data mistake, python align/sft.py (1 process)":
                [sys.executable, str(repo / "align/sft.py"), "--config", recipe, "--dataset_name", data,
                 "--output_dir", out],
            "import align.configs.sft only":
                [sys.executable, "-c", "import align.configs.sft"],
        }
        print(f"repo {repo}; median of {args.repeat} runs; noise = stderr lines other than the error")
        for name, command in cases.items():
            times, cpu, noise = [], [], 0
            for _ in range(args.repeat):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                proc = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
                times.append(time.perf_counter() - start)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
                lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith("error:")]
                noise = max(noise, len(lines))
            print(f"  wall {statistics.median(times):6.1f} s  cpu {statistics.median(cpu):6.1f} s  noise lines "
                  f"{noise:3d}  {name}", flush=True)


if __name__ == "__main__":
    main()
