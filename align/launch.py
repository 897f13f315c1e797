"""Launch helpers shared by every launch script (align/sft.py, align/dpo.py, align/grpo.py, align/train.py) and the
``qwen-image-align`` CLI:
config parsing (TRL's ``--config recipe.yaml`` plus ``--key value`` overrides), the output-dir / resume checks
every trainer runs before loading the model, and the process exit (one ``error:`` line for user mistakes)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from qwen_image.errors import UserError, on_processes

logger = logging.getLogger("align")

# What a trainer writes into output_dir: finding any of them there means a previous run lives in it.
RUN_OUTPUTS = ("pytorch_lora_weights.safetensors", "transformer", "trainer_state.json", "training_args.bin")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# A checkpoint is written under this name and renamed to checkpoint-N only when complete (trainers/base.py).
# Options shown by the short --help besides the project's own fields (the rest: --help-all).
COMMON_TRAINING_ARGS = (
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "gradient_checkpointing", "save_steps", "save_strategy", "save_total_limit", "logging_steps", "report_to",
    "run_name", "seed", "use_cpu", "bf16",
)


HELP_OVERRIDES = {
    "resume_from_checkpoint": (
        "resume a run: 'last' (or true) = the newest complete checkpoint-N in output_dir, or a new run when "
        "output_dir holds none yet; or a checkpoint-N folder. A checkpoint resumes only a run of the same "
        "objective, model, finetune mode and lora_rank (set save_strategy / save_steps to write checkpoints)"),
}


# ---------------------------------------------------------------------------------------------------- parsing
def _raise_user_error(message: str) -> None:
    raise UserError(message)


def _make_parser(config_class):
    from trl import TrlParser

    # allow_abbrev=False: `--learning_rat` must be an error, not a silent abbreviation of --learning_rate.
    parser = TrlParser((config_class,), allow_abbrev=False)
    parser.error = _raise_user_error  # argparse errors (bad value, missing argument) become one line
    for action in parser._actions:  # transformers' text does not know our `last`
        if action.dest in HELP_OVERRIDES:
            action.help = HELP_OVERRIDES[action.dest]
    return parser


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_hint(name: str, valid: Sequence[str], config_class) -> str:
    """What follows "unknown option X": the objectives whose configs have X (an option of another objective, e.g.
    a flow-matching option given to an online one), else the closest valid name."""
    from .objectives import available_objectives, get_objective

    owners = [objective for objective in available_objectives()
              if name in getattr(get_objective(objective).resolved("config_class"), "__dataclass_fields__", {})]
    if owners:
        return f" (an option of {', '.join(owners)}; {config_class.__name__} does not read it)"
    return _suggest(name, valid)


def _read_yaml_config(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}: not valid YAML{where} ({problem})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of option: value, got a {type(config).__name__}")
    return config


def _option_names(parser) -> list[str]:
    return [a.dest for a in parser._actions if a.option_strings and a.dest != "help"]


def _short_help(parser, config_class, prog: str) -> str:
    from transformers import TrainingArguments

    inherited = set(TrainingArguments.__dataclass_fields__)
    own = [f for f in dataclasses.fields(config_class) if f.init and f.name not in inherited]
    common = [f for f in dataclasses.fields(config_class) if f.name in COMMON_TRAINING_ARGS]
    lines = [f"usage: {prog} --config RECIPE.yaml [--key value ...]", "",
             "  --config RECIPE.yaml   a recipe (recipes/*.yaml): option: value per line; --key value overrides it",
             "  --help-all             every option, including all of transformers' TrainingArguments", ""]

    def describe(f) -> str:
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = HELP_OVERRIDES.get(f.name) or " ".join(str(f.metadata.get("help", "")).split())
        return f"  --{f.name} (default {default!r})" + (f"\n        {text}" if text else "")

    lines.append(f"{config_class.__name__} options:")
    lines += [describe(f) for f in own]
    lines += ["", "common training options (transformers.TrainingArguments):"]
    lines += [describe(f) for f in common]
    return "\n".join(lines)


def parse_config(config_class, argv: Sequence[str] | None = None, return_remaining: bool = False):
    """``--config recipe.yaml`` plus CLI overrides, as in TRL scripts (``trl.TrlParser``), with user errors as one
    :class:`UserError` line: a missing or invalid YAML file, an unknown key (with the closest valid one), a bad
    value. ``-h/--help`` prints the project's options, ``--help-all`` everything (both exit 0).

    With ``return_remaining`` unknown command-line arguments are returned (the CLI hands them to accelerate)
    instead of being an error: ``(config, remaining)``."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _make_parser(config_class)
    prog = Path(sys.argv[0]).name if argv is None else config_class.__name__
    if "--help-all" in args:
        parser.print_help()
        raise SystemExit(0)
    if "-h" in args or "--help" in args:
        print(_short_help(parser, config_class, prog))
        raise SystemExit(0)
    config_path = None
    for i, arg in enumerate(args):
        if arg == "--config":
            if i + 1 >= len(args):
                raise UserError("--config needs a recipe path (e.g. --config recipes/tiny/sft_lora.yaml)")
            config_path = args[i + 1]
            del args[i:i + 2]
            break
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
            del args[i]
            break
    valid = _option_names(parser)
    values: dict = {}
    if config_path is not None:
        values = _read_yaml_config(config_path)
        env = values.pop("env", None) or {}
        if not isinstance(env, dict):
            raise UserError(f"{config_path}: 'env' must be a mapping of VARIABLE: value")
        unknown = [k for k in values if k not in valid]
        if unknown:
            key = unknown[0]
            raise UserError(f"{config_path}: unknown option {key!r}{_unknown_hint(key, valid, config_class)}; "
                            f"see --help for the options of {config_class.__name__}")
        for key, value in env.items():
            os.environ[key] = str(value)
        parser.set_defaults_with_config(**values)
    if _wants_estimate_only(args, values) and not _has_accelerator():
        # Planning a GPU on a laptop: the estimate needs no device, and TrainingArguments would refuse bf16 here.
        args = [*args, "--use_cpu", "true"]
    try:
        config, remaining = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True,
                                                               look_for_args_file=False)
    except UserError:
        raise
    except (ValueError, TypeError) as err:  # a __post_init__ check of the config: the user's values are wrong
        raise UserError(str(err)) from None
    if hasattr(config, "model_family"):  # an unknown family (or a plugin that fails to import): one line, now
        from .models import get_model_family

        get_model_family(config.model_family)
    check_training_values(config)
    if return_remaining:
        return config, remaining
    if remaining:
        flag = next((a for a in remaining if a.startswith("-")), remaining[0])
        name = flag.lstrip("-").split("=")[0].replace("-", "_")
        raise UserError(f"unknown option {flag!r}{_unknown_hint(name, valid, config_class)}; see --help")
    return config


def _wants_estimate_only(args: Sequence[str], values: dict) -> bool:
    truthy = ("true", "1", "yes", "y")
    for i, arg in enumerate(args):
        if arg == "--estimate_only":
            following = args[i + 1] if i + 1 < len(args) else "--"
            return following.startswith("--") or following.lower() in truthy
        if arg.startswith("--estimate_only="):
            return arg.split("=", 1)[1].lower() in truthy
    return str(values.get("estimate_only", "false")).lower() in truthy


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()


def check_training_values(config: Any) -> None:
    """Values transformers checks only when the optimizer or scheduler is built (after the data is cached and the
    weights loaded), or never: one line each, before anything runs."""
    def value(name):
        return getattr(config, name, None)

    checks = [
        ("learning_rate", lambda v: v is not None and not v >= 0, "must be >= 0"),
        ("weight_decay", lambda v: v is not None and not v >= 0, "must be >= 0"),
        ("max_grad_norm", lambda v: v is not None and not v >= 0, "must be >= 0 (0 switches clipping off)"),
        ("warmup_steps", lambda v: v is not None and v < 0, "must be >= 0"),
        ("warmup_ratio", lambda v: v is not None and not 0 <= v <= 1, "must be in [0, 1]"),
        ("num_train_epochs", lambda v: v is not None and not v > 0, "must be > 0"),
        ("per_device_train_batch_size", lambda v: v is not None and v < 1, "must be >= 1"),
        ("gradient_accumulation_steps", lambda v: v is not None and v < 1, "must be >= 1"),
        ("logging_steps", lambda v: v is not None and not v > 0, "must be > 0"),
        ("save_total_limit", lambda v: v is not None and v < 1, "must be >= 1 (or unset to keep every checkpoint)"),
        ("max_steps", lambda v: v is not None and v < -1, "must be > 0, or -1 to train num_train_epochs"),
        ("dataloader_num_workers", lambda v: v is not None and v < 0, "must be >= 0"),
        ("reward_no_signal_limit", lambda v: v is not None and v < 0, "must be >= 0 (0 switches the check off)"),
    ]
    for name, bad, rule in checks:
        if bad(value(name)):
            raise UserError(f"--{name} {value(name)}: {rule}")
    if value("save_strategy") is not None and str(getattr(value("save_strategy"), "value", value("save_strategy"))) == "steps":
        if value("save_steps") is not None and not value("save_steps") > 0:
            raise UserError(f"--save_steps {value('save_steps')}: must be > 0 with save_strategy steps")


# ---------------------------------------------------------------------------------------------------- runs
def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def _checkpoint_step(path: Path) -> int | None:
    import json

    try:
        return int(json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def last_complete_checkpoint(output_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest complete ``checkpoint-N`` (its manifest lists every file a resume reads, all present: see
    :mod:`align.checkpoints`). Incomplete ones (a file removed or truncated, a save that did not finish, a
    checkpoint of an older version) are skipped with a warning rather than resumed from."""
    from .checkpoints import incompleteness

    for _step, path in reversed(_checkpoints(Path(output_dir))):
        problem = incompleteness(path)
        if problem is None and _checkpoint_step(path) is not None:
            return path
        if warn:
            logger.warning("skipping %s: incomplete checkpoint (%s)", path, problem or "no readable trainer_state.json")
    return None


def previous_run_outputs(output_dir: str | Path) -> list[str]:
    """Names of what an earlier run left in ``output_dir`` (checkpoints, adapter, trainer state)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p.name for _, p in _checkpoints(folder)]
    found += [name for name in RUN_OUTPUTS if (folder / name).exists()]
    return found


def _check_resumable(ckpt: Path, config: Any, option: str) -> None:
    from .checkpoints import foreign_reason, incompleteness

    problem = incompleteness(ckpt)
    if problem is None and _checkpoint_step(ckpt) is None:
        problem = "no readable trainer_state.json"
    if problem is not None:
        raise UserError(f"{option}: {ckpt} is not a complete checkpoint ({problem}); resume from an earlier "
                        f"checkpoint-N or with --resume_from_checkpoint last")
    reason = foreign_reason(ckpt, config)
    if reason is not None:
        raise UserError(f"{option}: refusing {ckpt}: {reason}; or choose another --output_dir")


def prepare_run(config: Any) -> str | None:
    """Checks every launcher runs before loading the model; returns (and stores in the config) the checkpoint to
    resume from.

    - ``max_steps 0`` trains nothing: an error (``-1`` means "train num_train_epochs").
    - ``resume_from_checkpoint``: a checkpoint folder, or ``last``/``true`` = the newest complete
      ``checkpoint-N`` in output_dir (a new run when output_dir holds no run yet). A checkpoint that is incomplete,
      written by another objective / model kind / LoRA rank, or past ``max_steps`` is refused in one line.
    - an output_dir that holds a previous run (checkpoints, adapter, trainer state) is refused unless resuming
      or ``--overwrite_output_dir``, which also removes the old ``checkpoint-*`` folders so ``last`` can never
      pick them up later.
    """
    if config.max_steps == 0:
        raise UserError("max_steps 0 trains nothing: set max_steps > 0 (or -1 to train num_train_epochs)")
    out = Path(config.output_dir)
    ckpt = config.resume_from_checkpoint
    overwrite = getattr(config, "overwrite_output_dir", False)
    if ckpt in (None, "", "false", "False", "none", "None"):
        ckpt = None
    elif str(ckpt).lower() in ("last", "true"):
        option = f"--resume_from_checkpoint {ckpt}"
        found = None if overwrite else last_complete_checkpoint(out)
        if found is not None:
            _check_resumable(found, config, option)
            ckpt = str(found)
        else:
            previous = previous_run_outputs(out)
            if previous and not overwrite:
                shown = ", ".join(previous[:3]) + (", ..." if len(previous) > 3 else "")
                raise UserError(f"{option}: {out} holds a run ({shown}) but no complete checkpoint to resume "
                                f"(save_strategy 'no', or each checkpoint incomplete): pass --overwrite_output_dir "
                                f"to start it over, or choose another --output_dir")
            if not previous:
                logger.info("%s: no run in %s yet, starting a new one", option, out)
            ckpt = None
    else:
        if not Path(ckpt).is_dir():
            raise UserError(f"--resume_from_checkpoint {ckpt}: no such checkpoint folder")
        _check_resumable(Path(ckpt), config, f"--resume_from_checkpoint {ckpt}")
    if ckpt is not None:
        step = _checkpoint_step(Path(ckpt))
        if config.max_steps > 0 and step is not None and step > config.max_steps:
            raise UserError(f"checkpoint {ckpt} is at step {step}, past max_steps {config.max_steps}: it belongs to "
                            f"another run; raise max_steps or use another output_dir")
        logger.info("resuming from %s", ckpt)
    else:
        previous = previous_run_outputs(out)
        if previous and not overwrite:
            shown = ", ".join(previous[:3]) + (", ..." if len(previous) > 3 else "")
            resumable = last_complete_checkpoint(out, warn=False) is not None
            todo = "pass --resume_from_checkpoint last to continue it, " if resumable else ""
            raise UserError(f"output_dir {out} already holds a run ({shown}): {todo}--overwrite_output_dir to "
                            f"replace it, or choose another --output_dir")
        if previous and config.process_index == 0:
            for _, path in _checkpoints(out):
                shutil.rmtree(path)
            logger.warning("overwrite_output_dir: replacing the run in %s (old checkpoints removed)", out)
    config.resume_from_checkpoint = ckpt
    return ckpt


# ---------------------------------------------------------------------------------------------------- exit
def _finish_tracking() -> None:
    wandb = sys.modules.get("wandb")  # never imported: no run to finish (importing it only to check costs ~1 s)
    if wandb is None:
        return
    try:
        if wandb.run is not None:
            wandb.finish()
    except Exception:  # tracking must never turn a finished run into a failure
        pass


# The run being trained in this process (set by train_main once its options are parsed), for the Ctrl-C line.
_ACTIVE: dict[str, Any] = {}
# The command the user typed, as a JSON list, set by ``qwen-image-align`` for the training processes it starts.
COMMAND_ENV = "QWEN_IMAGE_ALIGN_COMMAND"
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def _resume_command() -> list[str]:
    import json

    try:
        command = json.loads(os.environ[COMMAND_ENV])
    except (KeyError, ValueError):
        command = ["qwen-image-align", _ACTIVE.get("objective", "sft"), *_ACTIVE.get("argv", [])]
    kept: list[str] = []
    i = 0
    while i < len(command):  # drop the options a resume must not repeat (an overwrite would start over)
        name = command[i].split("=", 1)[0]
        i += 1
        if name in ("--resume_from_checkpoint", "--overwrite_output_dir"):
            if "=" not in command[i - 1] and i < len(command) and not command[i].startswith("--"):
                i += 1  # its value
            continue
        kept.append(command[i - 1])
    return [*kept, "--resume_from_checkpoint", "last"]


def interrupted_message() -> str:
    """The one line printed at Ctrl-C: what is saved and the command that continues the run."""
    import shlex

    config = _ACTIVE.get("config")
    if config is None:
        return "interrupted (Ctrl-C) before training started: nothing was saved; the same command starts it again"
    out = Path(config.output_dir)
    ckpt = last_complete_checkpoint(out, warn=False)
    command = _resume_command()
    if ckpt is None:
        strategy = str(getattr(config.save_strategy, "value", config.save_strategy))
        why = (f"the first is saved at step {config.save_steps}" if strategy == "steps" else
               f"save_strategy is {strategy!r}: set --save_strategy steps --save_steps N to save during training")
        again = command[:-2]
        if previous_run_outputs(out):  # an older run this one was replacing: starting again must replace it too
            again.append("--overwrite_output_dir")
        return (f"interrupted (Ctrl-C): no checkpoint in {out} yet, nothing to resume ({why}); start again with: "
                f"{shlex.join(again)}")
    return (f"interrupted (Ctrl-C): saved up to step {_checkpoint_step(ckpt)} ({ckpt}); resume with: "
            f"{shlex.join(command)}")


def _interrupted_while_starting(signum, frame) -> None:
    # Python would raise KeyboardInterrupt inside whichever import is running: a traceback through the import
    # machinery for a run that has done nothing yet. Nothing is open or half-written either, so leave at once.
    if os.environ.get("RANK", "0") == "0":
        print(interrupted_message(), file=sys.stderr, flush=True)
    os._exit(INTERRUPTED)


def exit_at_ctrl_c_while_starting() -> None:
    """From now until :func:`ctrl_c_raises_again`, Ctrl-C prints the one "interrupted (Ctrl-C) before training
    started" line and exits 130. A launch script calls it before it imports torch and the libraries (the first
    ~10 s of a run), ``qwen-image-align`` before it checks the options. Only where Ctrl-C has Python's default
    handling: a background job (SIGINT ignored) and a handler of the caller's are left alone."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def ctrl_c_raises_again() -> None:
    """Undo :func:`exit_at_ctrl_c_while_starting`: Ctrl-C raises KeyboardInterrupt again, which
    :func:`run_main` turns into its line (what was saved, the command that resumes)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_OWN_PACKAGES = tuple(os.sep + name + os.sep for name in ("align", "qwen_image", "rewards", "annotation"))


def wrapped_user_error(err: BaseException) -> UserError | None:
    """The UserError a library raised ours inside of: the explicit cause chain (``raise X from err``), and the
    implicit context when the outer exception was raised by library code (a bug in our own handler keeps its
    traceback)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        nxt = current.__cause__
        if nxt is None and not current.__suppress_context__ and _raised_by_library(current):
            nxt = current.__context__
        current = nxt
    return None


def _raised_by_library(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and not any(part in last for part in _OWN_PACKAGES)


# How long a process that hit a user error waits for the other processes of the run to report theirs (they read
# the same data and options, so they meet the same mistake within moments) before it concludes it is alone.
SHARE_WAIT_S = 10.0
_ERRORS_KEY = "qwen_image_align/user_error"


def say_user_error(err: UserError) -> None:
    """Print ``error: <err>`` once per run, however many processes raise it.

    One process: print. An error every process raises at the same point after agreeing on it (a shared verdict,
    ``same_on_every_process``): the first process prints. Any other error in a multi-process run goes through the
    run's rendezvous store (:func:`_shared_error_line`): each process that hits it posts it, the processes that
    raised the same line agree on one of them to print it, and a line only some processes raised names them
    ("on process 1 of 2, not the others")."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if getattr(err, "same_on_every_process", False):
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return
    if world <= 1:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return
    _shared_error_line(str(err), rank, world)


def _run_store():
    """A client of the store the launcher (torchrun's agent, ``accelerate launch``) serves at MASTER_ADDR:MASTER_PORT
    for every process of the run; it exists from the start, before (or without) any process group. None when it
    cannot be reached (a launcher without one): each process then prints its own line."""
    from datetime import timedelta

    try:
        import torch.distributed as dist

        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=5))
    except Exception:  # no store to share through: saying the line per process beats not saying it
        return None


def _shared_error_line(message: str, rank: int, world: int) -> None:
    import hashlib
    import time
    from datetime import timedelta

    store = _run_store()
    if store is None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    # Per launch attempt (torchrun restarts a failed run with the same store when max_restarts > 0).
    prefix = f"{_ERRORS_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    keys = [f"{prefix}/rank/{r}" for r in range(world)]
    try:
        store.set(keys[rank], message)
        deadline = time.monotonic() + SHARE_WAIT_S
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.05)
        posted = [r for r in range(world) if store.check([keys[r]])]
        same = [r for r in posted if store.get(keys[r]).decode("utf-8") == message]
        said = f"{prefix}/said/{hashlib.sha1(message.encode('utf-8')).hexdigest()}"
        if store.add(said, 1) > 1:
            # Another process prints this line: wait until it has, so that the launcher stopping every process
            # once this one exits cannot cut that process off before its line is out.
            store.wait([f"{said}/done"], timedelta(seconds=SHARE_WAIT_S))
            return
    except Exception:  # the store went away, or the printing process never got its line out: say it here
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    print(f"error: {message}{on_processes(min(same), len(same), world)}", file=sys.stderr, flush=True)
    try:
        store.set(f"{said}/done", "1")
    except Exception:
        pass


def run_main(main_fn: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Call a launch script's ``main`` and return its exit code: 0 done, 2 a :class:`UserError` (one
    ``error: ...`` line on stderr), the SystemExit code (``--help``: 0), 130 at Ctrl-C (one line: what was saved,
    the command that resumes), 1 anything else (with its traceback:
    that is a bug, not a user mistake)."""
    try:
        main_fn(argv)
        return 0
    except UserError as err:
        say_user_error(err)
        return 2
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int):
            return err.code or 0
        print(f"error: {err.code}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Nothing half-written is ever resumed (checkpoints are staged): say what is kept and how to go on, once.
        if os.environ.get("RANK", "0") == "0":
            # On a line of its own: a progress bar leaves the cursor at the end of its line.
            print(("\n" if "config" in _ACTIVE else "") + interrupted_message(), file=sys.stderr)
        return INTERRUPTED
    except BaseException as err:
        wrapped = wrapped_user_error(err)
        if wrapped is not None:  # a library wrapped our one-line error (a datasets.map worker, a callback, ...)
            say_user_error(wrapped)
            return 2
        import traceback

        traceback.print_exc()
        return 1


def run(main_fn: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a launch script's ``main`` (see :func:`run_main`) and end the process cleanly.

    2-process runs that import diffusers abort at exit ~5-13% of the time after all work is done; tearing the
    process group down and leaving with ``os._exit`` avoids it (wandb and files are flushed first).
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    ctrl_c_raises_again()  # the script's imports are done: from here run_main says what Ctrl-C leaves behind
    try:
        code = run_main(main_fn, argv)
    finally:
        _finish_tracking()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def train_main(objective: Any, argv: Sequence[str] | None = None) -> Any:
    """The one run skeleton of every objective (a registered name or an ``align.objectives.Objective``): parse ->
    check the run folder -> seed -> read the data (``load_data(config)``, before any weights load, so a data
    mistake costs seconds) -> load the model -> ``build_trainer(config, qwen, data)`` -> train (resuming if asked)
    -> save the adapter / weights, the trainer state (and the held-out evaluation where the trainer has one) ->
    return the trainer."""
    from transformers import set_seed

    from .adapters import check_init_adapter
    from .modeling import load_qwen_image
    from .models import family_of
    from .objectives import get_objective

    if isinstance(objective, str):
        objective = get_objective(objective)
    config = parse_config(objective.resolved("config_class"), argv)
    _ACTIVE.update(config=config, objective=objective.name, argv=list(sys.argv[1:] if argv is None else argv))
    if getattr(config, "estimate_only", False):  # the memory estimate needs neither data nor weights: print, exit
        from .memory import report_estimate
        from .modeling import estimate_subject

        print(estimate_subject(config), flush=True)
        report_estimate(config)
    checkpoint = prepare_run(config)
    family = family_of(config)
    if getattr(config, "validation_prompts", None) and family.is_edit(config):  # known before any weights load
        raise UserError("validation images for edit models need control images, which are not supported yet; "
                        "set validation_prompts: [] for an edit checkpoint.")
    check_init_adapter(config)  # a missing / truncated file or another rank: one line before the weights load
    set_seed(config.seed)  # before the model: the LoRA init draws from the global RNG
    data = objective.resolved("load_data")(config)
    qwen = load_qwen_image(config)
    # The one owner of encoder placement and release: every objective encodes (captions, images, prompts) on the
    # training device, and the text encoder leaves memory once the trainer has cached what it needs, unless the
    # trainer encodes new prompts while it trains (an online term with release_text_encoder off).
    family.place_encoders(qwen, config.device)
    trainer = objective.resolved("build_trainer")(config, qwen, data)
    if not getattr(trainer, "keeps_text_encoder", False) and qwen.text_encoder is not None:
        family.release_text_encoder(qwen)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(config.output_dir)
    if getattr(trainer, "evaluate_after_training", False) and trainer.eval_dataset is not None:
        trainer.evaluate()
    trainer.save_state()  # trainer_state.json: the log history (losses, rewards, metrics per step)
    if trainer.is_world_process_zero():
        logger.info("saved to %s", Path(config.output_dir).resolve())
    return trainer
