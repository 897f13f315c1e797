"""Resumable stages: a stage whose marker file exists is skipped on rerun, so a crash loses at most one stage.

The marker records the stage's inputs key (a hash of the config it reads and the keys of the stages it reads
from): a rerun with another config, or after an upstream stage was redone, redoes the stage instead of reusing
results made from other inputs (``--fast`` into the folder of a full run reruns everything).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

MARKER = "stage_done.json"


class StageError(RuntimeError):
    """A stage failed; the message names it and where its log is."""


def stage_key(config: Any, upstream: Sequence[str] = ()) -> str:
    """A short hash of what a stage reads: its config slice and the keys of the stages it depends on."""
    blob = json.dumps({"config": config, "upstream": list(upstream)}, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def stage_done(stage_dir: Path) -> dict | None:
    marker = stage_dir / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError:  # a marker cut short by a crash: redo the stage
        return None


def run_stage(index: int, total: int, name: str, stage_dir: Path, fn: Callable[[], dict | None],
              key: str | None = None) -> dict:
    """Run ``fn`` unless ``stage_dir`` holds a completion marker made with the same inputs ``key``; print progress
    and timing; return its result (with ``inputs_key``). A marker from other inputs: the folder is cleared and the
    stage reruns."""
    done = stage_done(stage_dir)
    header = f"[{index}/{total}] {name}"
    if done is not None and done.get("inputs_key") == key:
        print(f"{header}: done before ({done.get('seconds', 0):.0f} s), skipped", flush=True)
        done["skipped"] = True
        return done
    if done is not None:
        print(f"{header}: done before with other inputs (config or an earlier stage changed), redoing", flush=True)
    if stage_dir.exists():
        # Leftovers of another config (more candidates, other seeds...) would mix into this run's outputs.
        shutil.rmtree(stage_dir)
    print(f"{header} ...", flush=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = fn() or {}
    record = {"stage": name, "seconds": round(time.time() - start, 1), "inputs_key": key, **result}
    # Written last, atomically: only a stage that finished leaves a marker.
    tmp = stage_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, stage_dir / MARKER)
    print(f"{header}: done in {record['seconds']:.0f} s", flush=True)
    record["skipped"] = False
    return record


def accelerate_command(script: Path, recipe: Path, overrides: dict[str, Any]) -> list[str]:
    """``accelerate launch --quiet --num_processes 1 <script> --config <recipe> --key value ...`` (single CPU process)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate)] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    # --quiet: a failing run exits 1 without accelerate's CalledProcessError traceback after the run's own message
    cmd = [*launcher, "launch", "--quiet", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(script), "--config", str(recipe)]
    if not accelerate.exists():
        cmd.remove("launch")
    for key, value in overrides.items():
        if isinstance(value, (list, tuple)):
            cmd += [f"--{key}", *[str(v) for v in value]]
        else:
            cmd += [f"--{key}", str(value)]
    return cmd


def display(cmd: Sequence[str]) -> str:
    """The command as a user would type it (``accelerate launch ...`` rather than the venv's absolute path)."""
    shown = list(cmd)
    if shown and Path(shown[0]).name == "accelerate":
        shown[0] = "accelerate"
    here = str(Path.cwd()) + os.sep
    # Paths under the current folder are shown relative to it, as a user would type them.
    return shlex.join(a[len(here):] if a.startswith(here) else a for a in shown)


def run_logged(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run ``cmd``, echo its output and keep it in ``log_path``; a failure raises with the log's last lines."""
    print(f"  $ {display(cmd)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, cwd=cwd, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            shown = console_line(line)
            if shown:
                print("    " + shown, flush=True)
        code = proc.wait()
    if code:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(keepends=True)[-15:])
        raise StageError(f"command failed (exit {code}); full log: {log_path}\n{tail}")


# The metrics a console line shows of the Trainer's log dicts (the full dicts stay in the log and in wandb).
CONSOLE_METRICS = ("loss", "loss/sft", "loss/dpo", "rewards/accuracies",
                   *(f"{m}/{k}" for m in ("grpo", "nft", "awm", "dgpo") for k in ("reward", "frac_reward_zero_std")),
                   "grpo/kl/flow_grpo", "nft/kl", "eval_reward", "epoch", "train_runtime")


def console_line(line: str) -> str | None:
    """What the console shows of one line of a training log: loss lines cut to :data:`CONSOLE_METRICS`, data
    summaries and errors; None for library warnings and per-iteration bars."""
    text = line.strip()
    if not text or "Warning" in text or "warn(" in text:
        return None
    if text.startswith("{") and text.endswith("}"):
        try:
            metrics = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            metrics = None
        if isinstance(metrics, dict):
            kept = [f"{k} {metrics[k]}" for k in CONSOLE_METRICS if k in metrics]
            return ", ".join(kept) if kept else None
    if text.startswith(("data:", "error", "Traceback")):
        return text[:200]
    return None
