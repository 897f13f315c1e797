"""Launch helpers shared by align/sft.py, align/dpo.py and align/grpo.py."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

import torch.distributed as dist

logger = logging.getLogger("align")

# Exceptions that mean "the user asked for something wrong": one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def parse_config(config_class, argv: Sequence[str] | None = None):
    """``--config recipe.yaml`` plus CLI overrides, as in TRL scripts (trl.TrlParser)."""
    from trl import TrlParser

    parser = TrlParser((config_class,))
    (config,) = parser.parse_args_and_config(args=list(argv) if argv is not None else None)
    return config


def _finish_tracking() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except Exception:  # tracking must never turn a finished run into a failure
        pass


def run(main_fn: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a launch script's ``main`` and end the process cleanly.

    2-process runs that import diffusers abort at exit ~5-13% of the time after all work is done; tearing the
    process group down and leaving with ``os._exit`` avoids it (wandb and files are flushed first).
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    code = 0
    try:
        main_fn(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except SystemExit as err:  # --help, --estimate_only: a clean exit, not a crash
        code = err.code if isinstance(err.code, int) else 0
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        _finish_tracking()
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
