"""``qwen-image-align OBJECTIVE --config recipe.yaml [accelerate options] [--key value ...]``; the objectives are
those of the registry (``align/objectives.py``: sft, dpo, grpo, ... and any from ``QWEN_IMAGE_ALIGN_PLUGINS``).

TRL's ``trl sft|dpo --config`` convention: the recipe and ``--key value`` overrides are checked here first (a
mistake is one ``error:`` line, exit 2, before any process starts), every option the trainer does not know is
handed to ``accelerate launch`` (``--num_processes 2``, ``--config_file recipes/accelerate/fsdp2.yaml``, ...;
``--accelerate_config X`` is an alias of ``--config_file``), and the training script's exit code is passed through
without accelerate's CalledProcessError traceback (or torchrun's ChildFailedError report with several processes).
``accelerate launch align/sft.py ...`` keeps working.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Sequence

from qwen_image.errors import UserError


def _usage() -> str:
    from .objectives import available_objectives, get_objective

    names = available_objectives()
    lines = [f"usage: qwen-image-align {{{','.join(names)}}} --config RECIPE.yaml [accelerate options] [--key value ...]",
             "  qwen-image-align sft --help   the trainer's options;  accelerate launch --help   the launcher's", "",
             "objectives:"]
    lines += [f"  {n:<10} {get_objective(n).description}" for n in names]
    return "\n".join(lines)


def _config_class(command: str):
    from .objectives import get_objective

    return get_objective(command).resolved("config_class")


def _is_value(token: str) -> bool:
    return not token.startswith("-") or bool(re.fullmatch(r"-\d+(\.\d*)?([eE][-+]?\d+)?", token))


def split_arguments(command: str, args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch arguments, training script arguments): an option the trainer knows (or ``--config``)
    goes to the script with its values, any other option to accelerate. The script's part is validated here
    (:func:`align.launch.parse_config`: a mistake raises UserError before anything starts)."""
    from .launch import _make_parser, parse_config

    trainer_options = set(_make_parser(_config_class(command))._option_string_actions) | {"--config", "-h", "--help",
                                                                                         "--help-all"}
    launch: list[str] = []
    script: list[str] = []
    target = script
    for token in args:
        if token.startswith("-") and not _is_value(token):
            name = token.split("=", 1)[0]
            target = script if name in trainer_options else launch
        target.append(token)
    if "--accelerate_config" in launch:
        i = launch.index("--accelerate_config")
        if i + 1 >= len(launch):
            raise UserError("--accelerate_config needs a file (e.g. recipes/accelerate/multi_gpu.yaml)")
        launch[i] = "--config_file"
    parse_config(_config_class(command), script)
    _check_launch_args(launch, sorted(o for o in trainer_options if o.startswith("--")))
    return launch, script


def _check_launch_args(launch: list[str], trainer_options: Sequence[str] = ()) -> list[str]:
    from accelerate.commands.launch import launch_command_parser

    def error(message: str) -> None:
        raise UserError(f"accelerate launch: {message}")

    parser = launch_command_parser()
    parser.error = error  # type: ignore[method-assign]
    known, unknown = parser.parse_known_args([*launch, "SCRIPT"])
    if unknown:
        import difflib

        flag = unknown[0].split("=", 1)[0]
        accelerate_options = [o for o in parser._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(flag, [*trainer_options, *accelerate_options], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown option {flag!r} ({hint}neither a trainer option, see qwen-image-align "
                        f"<command> --help, nor an accelerate launch option)")
    if getattr(known, "config_file", None) and not Path(known.config_file).is_file():
        raise UserError(f"--config_file {known.config_file}: no such accelerate config file")
    # accelerate raises a bare ValueError for this one after the launcher has started (a traceback)
    if getattr(known, "multi_gpu", False) and known.num_processes is not None and known.num_processes < 2:
        raise UserError(f"accelerate launch: --multi_gpu needs --num_processes 2 or more (got {known.num_processes}); "
                        "drop --multi_gpu to run one process")
    return launch


# Imported by the training processes, never by the launcher: transformers imports peft as a side effect of importing
# ``TrainingArguments`` whenever peft is installed, and peft imports bitsandbytes and torchao; that is ~4.5 s of
# the ~7 s the launcher spent importing before its first check (``python -X importtime``), all of it paid again by
# each training process, which needs it. What the launcher still imports it uses: torch and transformers for
# ``TrainingArguments`` (whose ``__post_init__`` also imports transformers' model base class and torchao with it,
# ~3 s, through its reporting integrations: the same checks as in the training process, which cannot be left out),
# trl's parser and accelerate's launcher. (diffusers is not imported: ``align.losses`` loads its modules lazily.)
LAUNCHER_SKIPS = ("peft",)


def _skip_training_only_imports() -> None:
    """Mark :data:`LAUNCHER_SKIPS` as not installed for this process (``sys.modules[name] = None``: ``find_spec``
    then finds nothing, so transformers' ``is_peft_available()`` is False and it does not import peft).

    The launcher parses and checks the options, then ``accelerate launch`` starts fresh processes that import
    everything; nothing it runs uses peft. A plugin module (``QWEN_IMAGE_ALIGN_PLUGINS``, imported here too) may
    import anything, so with plugins nothing is skipped."""
    from .plugins import PLUGINS_ENV

    if os.environ.get(PLUGINS_ENV, "").strip():
        return
    for name in LAUNCHER_SKIPS:
        if name not in sys.modules and not any(m.startswith("transformers") for m in sys.modules):
            sys.modules[name] = None  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``qwen-image-align`` program. ``argv`` None: this process is the launcher (the console script, ``python
    -m align.cli``) and skips the imports only training needs; a list: called from Python (tests), nothing is
    skipped, since the caller may train in this process afterwards."""
    if argv is None:
        from .launch import exit_at_ctrl_c_while_starting

        exit_at_ctrl_c_while_starting()  # until the training processes start: Ctrl-C is one line, exit 130
        _skip_training_only_imports()
    from .launch import run_main
    from .objectives import available_objectives, get_objective

    args = list(sys.argv[1:] if argv is None else argv)
    names: list[str] = []
    code = run_main(lambda _argv: names.extend(available_objectives()))  # a bad plugin module: one line, exit 2
    if code:
        return code
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in names:
        print(f"error: unknown command {command!r}; choose one of {', '.join(names)}", file=sys.stderr)
        return 2

    result: dict = {}

    def prepare(_argv):
        result["split"] = split_arguments(command, rest)

    code = run_main(prepare)
    if code or "split" not in result:  # --help (0) or a one-line error (2)
        return code
    launch, script = result["split"]
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser

    objective = get_objective(command)
    launch_args = launch_command_parser().parse_args([*launch, str(objective.script_path),
                                                      *objective.script_arguments(), *script])
    _fill_launch_defaults(launch_args)
    import json

    from .launch import COMMAND_ENV, INTERRUPTED, ctrl_c_raises_again

    # The training processes print the command that resumes them at Ctrl-C: the one typed here.
    os.environ[COMMAND_ENV] = json.dumps(["qwen-image-align", *args])
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    _quiet_elastic_agent()
    # From here Ctrl-C also reaches the training processes: wait for their line (below) instead of leaving at once.
    ctrl_c_raises_again()
    try:
        launch_command(launch_args)
    except ChildFailedError as err:
        # Several processes (torchrun): each already printed its line (or its traceback); keep the first failure's
        # exit code instead of torch's failure report, and say which signal killed a process (nothing else will).
        rank, failure = err.get_first_failure()
        return _exit_code(failure.exitcode, rank)
    except subprocess.CalledProcessError as err:
        # The script already printed its one `error:` line (or its traceback): keep its exit code, add nothing.
        if err.returncode < 0 and -err.returncode == 2:  # the script died of SIGINT itself
            return INTERRUPTED
        return err.returncode if err.returncode > 0 else 1
    except KeyboardInterrupt:
        # Ctrl-C reached the training processes too: let them print their line (what was saved, the resume
        # command) before this process leaves, so the shell prompt comes after it.
        _wait_for_children()
        return INTERRUPTED
    except SignalException as err:
        # Several processes: torchrun's agent turns Ctrl-C into this after it has passed the signal on to the
        # training processes (their own session, not the terminal's) and waited for them: they said their line.
        import signal

        if err.sigval != signal.SIGINT:
            raise
        return INTERRUPTED
    return 0


def _exit_code(code: int, rank: int) -> int:
    import signal

    if code >= 0:
        return code if code else 1
    if -code == signal.SIGINT:
        from .launch import INTERRUPTED

        return INTERRUPTED
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (out of memory?)" if -code == signal.SIGKILL else ""
    print(f"error: training process {rank} was killed by {name}{hint}", file=sys.stderr)
    return 128 - code


def _quiet_elastic_agent() -> None:
    """torchrun's agent logs, after any process fails, that it stops the others and which one failed with which
    code, and at Ctrl-C that it passes the signal on: the processes say what happened themselves (their one line,
    or a traceback), so only these records are dropped, here in the launcher."""
    import logging
    import re

    noise = re.compile(r"Sending process \d+ closing signal SIG(TERM|INT)|failed \(exitcode: -?\d+\) local_rank: \d+|"
                       r"Received (2|SIGINT) death signal, shutting down workers")

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not noise.search(record.getMessage())

    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).addFilter(_Drop())


def _fill_launch_defaults(launch_args) -> None:
    """Without an accelerate config (``--config_file`` or ``accelerate config``'s default file), accelerate fills
    the values nobody gave with its defaults and prints a five-line warning listing them on every run. Give it those
    same defaults here so the warning stays for what a user should hear about: on a machine with accelerators the
    process count is left to accelerate (one per device, and its note when it turns multi-GPU on)."""
    from accelerate.commands.config import default_config_file

    from .launch import _has_accelerator

    if launch_args.config_file is not None or os.path.isfile(default_config_file):
        return
    defaults = {"num_machines": 1, "mixed_precision": "no", "dynamo_backend": "no"}
    if not _has_accelerator():
        defaults["num_processes"] = 1  # accelerate's own default counts CUDA devices: 0 on a CPU-only machine
    for name, value in defaults.items():
        if getattr(launch_args, name, None) is None:
            setattr(launch_args, name, value)


def _wait_for_children() -> None:
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            return


if __name__ == "__main__":
    sys.exit(main())
