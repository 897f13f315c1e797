"""The main job on CPU: the brand-adapter workflow on a tiny random Qwen-Image (``qwen-image-demo``).

    qwen-image-demo                               # full demo into outputs/demo (minutes on a laptop CPU)
    qwen-image-demo --fast --output_dir /tmp/d    # a few steps per stage (tests)

Rerunning skips the stages that completed with the same inputs (a stage whose config, recipe or upstream stage
changed is redone; delete a stage's folder to redo it, or pass --restart).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qwen-image-demo",
        description="Brand-adapter workflow on a tiny random Qwen-Image (CPU): brand data, SFT LoRA, pairs labelled "
                    "by the OCR reward, the combined objective (DPO + an online RL term), adapter export (diffusers + ComfyUI) and a report.")
    parser.add_argument("--output_dir", default="outputs/demo", help="where every stage writes (default: outputs/demo)")
    parser.add_argument("--config", default="recipes/demo/brand_adapter.yaml", help="workflow YAML")
    parser.add_argument("--fast", action="store_true", help="a few steps per stage (plumbing check, used by tests)")
    parser.add_argument("--seed", type=int, default=None,
                        help="the workflow seed (data ratings, VAE fit, SFT, pairs, alignment); default: the config's. "
                             "The evaluation seeds stay the held-out ones, so runs with different seeds are comparable")
    parser.add_argument("--restart", action="store_true", help="delete --output_dir first instead of resuming")
    return parser.parse_args(argv)


def _quiet_progress_bars() -> None:
    # Per-file "Loading weights" bars from every model load drown the per-stage progress lines.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Library chatter (diffusers/transformers deprecations) hides the stage progress; errors still show.
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Before torch loads: OpenMP threads that spin while waiting stall badly when other jobs share the cores
    # (measured: the VAE fit ~10x slower on 2 busy cores); passive waiting costs little on an idle machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _quiet_progress_bars()
    import yaml

    from .workflows.brand_adapter import run_workflow
    from .workflows.config import load_workflow_config
    from .workflows.stages import StageError, stage_done

    try:
        cfg = load_workflow_config(args.config, fast=args.fast)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        print(f"error: --config {args.config}: not valid YAML{where} ({problem})", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        print(f"error: --output_dir {out}: {existing} is a file, not a folder: choose a folder (it is created if "
              f"missing)", file=sys.stderr)
        return 2
    if args.seed is not None:
        cfg["seed"] = args.seed
    if args.restart and out.exists():
        shutil.rmtree(out)
    try:
        results = run_workflow(cfg, out)
    except KeyboardInterrupt:
        done = sorted(p.name for p in out.iterdir() if stage_done(p) is not None) if out.is_dir() else []
        print(f"interrupted (Ctrl-C): the completed stages in {out} are kept ({', '.join(done) or 'none yet'}); "
              f"resume with: qwen-image-demo{' --fast' if args.fast else ''} --output_dir {out} --config "
              f"{args.config}", file=sys.stderr)
        # Leave now: a Ctrl-C that reaches the interpreter's shutdown (threads of the libraries, a second signal to
        # the process group) would turn exit 130 into death by SIGINT; every completed stage is on disk already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except (StageError, ValueError, FileNotFoundError) as err:
        # A stage that cannot go on (a failed training command, no usable pairs...): one line, no traceback;
        # completed stages stay done, so a rerun resumes here.
        print(f"error: {err}", file=sys.stderr)
        return 1
    report = results["report"]
    aligned = report.get("aligned_label", "DPO+GRPO")
    print(f"\ndone in {results['total_seconds']['seconds']:.0f} s")
    print(f"adapter (diffusers): {results['adapter']['adapter_dir']}/pytorch_lora_weights.safetensors")
    print(f"adapter (ComfyUI):   {results['adapter']['adapter_dir']}/pytorch_lora_weights_comfyui.safetensors")
    print(f"report:              {report['report']}")
    print(f"OCR on held-out seeds: before SFT {report['ocr']['before']:.3f}, after SFT "
          f"{report['ocr']['sft']:.3f}, after {aligned} {report['ocr']['aligned']:.3f}")
    for key, label in (("train/aligned", "training prompts"), ("heldout/aligned", "held-out prompts")):
        g = report["gains"].get(key)
        if g:
            o = g["overall"]
            print(f"{aligned} gain over SFT, {label}: {o['gain']:+.3f} (95 % interval {o['low']:+.3f} .. {o['high']:+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
