"""Ctrl-C during training (SIGINT to the terminal's process group, as a shell sends it): one line saying what was
saved and the command that resumes, exit 130, no KeyboardInterrupt traceback; the printed command resumes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_helpers import rated_images
from run_helpers import ROOT, launch_env


def _terminal_foreground_job() -> None:
    """Run in the child before it starts (``preexec_fn``): Ctrl-C's default action, as a terminal's foreground job has.

    A test runner started in the background (``nohup``, ``cmd &`` in a script: the shell sets SIGINT to ignored for
    background jobs) passes SIGINT *ignored* to every process it starts; Python then installs no KeyboardInterrupt
    handler and the run never sees Ctrl-C (it trained on and exited 0). A shell starts a foreground command with the
    default action, which is what these tests are about."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=launch_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_terminal_foreground_job)


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, "the run never reached the point to interrupt"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # the whole foreground group, as Ctrl-C in a terminal


def test_ctrl_c_through_qwen_image_align_says_what_was_saved_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "align.cli", "sft", "--config", str(ROOT / "recipes/tiny/sft_lora.yaml"),
               "--dataset_name", str(rated_images(tmp_path / "data", n=2)), "--output_dir", str(out), "--max_steps", "4000",
               "--save_strategy", "steps", "--save_steps", "1", "--validation_prompts", "[]", "--overwrite_output_dir"]
    proc = _start(command, tmp_path)
    # Any checkpoint past the first: the recipe keeps 5 (save_total_limit), so on a fast machine a given one
    # (checkpoint-2) can be saved and rotated away between two polls.
    _interrupt_when(proc, lambda: any(p.name[11:].isdigit() and int(p.name[11:]) >= 2 for p in out.glob("checkpoint-*")))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted (Ctrl-C)")]
    assert len(lines) == 1, err[-3000:]
    assert "saved up to step" in lines[0] and f"{out}/checkpoint-" in lines[0], lines[0]
    resume = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert resume[:2] == ["qwen-image-align", "sft"] and resume[-2:] == ["--resume_from_checkpoint", "last"]
    assert "--overwrite_output_dir" not in resume  # it would start the run over
    # The printed command continues the run (a few more steps).
    resume = [sys.executable, "-m", "align.cli", *resume[1:]]
    i = resume.index("--max_steps")
    resume[i + 1] = str(max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) + 1)
    done = subprocess.run(resume, env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr


def test_ctrl_c_in_the_demo_is_one_line_and_exit_130(tmp_path):
    out = tmp_path / "demo"
    proc = _start([sys.executable, "-m", "align.demo", "--fast", "--output_dir", str(out), "--config",
                   str(ROOT / "recipes/demo/brand_adapter.yaml")], tmp_path)
    _interrupt_when(proc, lambda: (out / "data" / "stage_done.json").is_file())
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "data" in lines[0] and "resume with: qwen-image-demo --fast" in lines[0], err[-3000:]


def _started_process(pid: int, script: str) -> int | None:
    """The descendant of ``pid`` that runs ``script``: a training process that ``qwen-image-align`` starts through
    ``accelerate launch`` (torchrun's agent starts each in a session of its own, so look by parent, not session)."""
    parents, scripts = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state ppid ...
        scripts[int(entry.name)] = any(arg.decode(errors="replace").endswith(script) for arg in cmdline)
    for child, runs_script in scripts.items():
        ancestor = parents.get(child)
        while runs_script and ancestor not in (None, 0, 1):
            if ancestor == pid:
                return child
            ancestor = parents.get(ancestor)
    return None


def _importing_torch(pid: int | None) -> bool:
    """``pid`` has mapped torch's C++ library: it is importing torch, and transformers and the rest after it, seconds
    of work before anything of the run starts (a fixed delay would race a fast machine)."""
    try:
        return pid is not None and "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _interrupted_while_importing(command: list[str], cwd: Path, script: str | None = None) -> None:
    """Start ``command`` and Ctrl-C it as soon as it (or, with ``script``, the training process it starts) imports
    torch; then check the one line and exit 130, and that nothing was written."""
    proc = _start(command, cwd)
    end = time.monotonic() + 120
    while not _importing_torch(proc.pid if script is None else _started_process(proc.pid, script)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, "the process never imported torch"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # the whole foreground group, as Ctrl-C in a terminal
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["interrupted (Ctrl-C) before training started: nothing was saved; the same command starts it "
                     "again"], err[-3000:]
    assert not (cwd / "run").exists()


def _run_arguments(tmp_path: Path) -> list[str]:
    return ["--config", str(ROOT / "recipes/tiny/sft_lora.yaml"), "--dataset_name",
            str(rated_images(tmp_path / "data", n=2)), "--output_dir", str(tmp_path / "run")]


def test_ctrl_c_while_the_script_imports_is_one_line(tmp_path):
    """``python align/sft.py``: Ctrl-C in the first seconds, while torch and transformers import."""
    _interrupted_while_importing([sys.executable, str(ROOT / "align/sft.py"), *_run_arguments(tmp_path)], tmp_path)


def test_ctrl_c_while_qwen_image_align_imports_is_one_line(tmp_path):
    """``qwen-image-align``: Ctrl-C while the launcher imports what checks the options, then (a second run) while
    the training process it started imports."""
    command = [sys.executable, "-m", "align.cli", "sft", *_run_arguments(tmp_path)]
    _interrupted_while_importing(command, tmp_path)
    _interrupted_while_importing(command, tmp_path, script="align/sft.py")


def test_ctrl_c_while_two_training_processes_import_is_one_line(tmp_path):
    """Two processes: torchrun's agent passes Ctrl-C on to them and raises in the launcher; still the one line (from
    process 0), exit 130, and none of the agent's records."""
    command = [sys.executable, "-m", "align.cli", "sft", "--multi_gpu", "--num_processes", "2",
               *_run_arguments(tmp_path)]
    _interrupted_while_importing(command, tmp_path, script="align/sft.py")
