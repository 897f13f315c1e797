"""A user mistake found inside the training processes of a 2-process run (CPU, gloo) is one ``error:`` line for the
run, not one per process, exit 2: through ``qwen-image-align`` and through ``accelerate launch`` itself. A mistake
only one process meets is still said, naming that process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import rated_images
from run_helpers import ROOT, launch_env

SFT = str(ROOT / "recipes/tiny/sft_lora.yaml")
pytestmark = pytest.mark.slow  # each test starts two training processes


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env or launch_env(), timeout=400, cwd=cwd)


def test_a_data_mistake_every_process_meets_is_one_line(tmp_path):
    data = rated_images(tmp_path / "data", n=3)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[1]["prompt"] = 5
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _run([sys.executable, "-m", "align.cli", "sft", "--config", SFT, "--multi_gpu", "--num_processes", "2",
                 "--dataset_name", str(data), "--output_dir", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "row 1 (file_name='1.png'): 'prompt' is 5 (a number)" in errors[0] and "process" not in errors[0]


def test_through_accelerate_launch_itself_a_bad_init_adapter_is_one_line(tmp_path):
    """``accelerate launch --multi_gpu`` adds its own failure report after the run (its rule for any failed child),
    but the script's line is printed once."""
    adapter = tmp_path / "truncated.safetensors"
    adapter.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 str(ROOT / "align/sft.py"), "--config", SFT, "--dataset_name", str(rated_images(tmp_path / "d")),
                 "--output_dir", str(tmp_path / "o"), "--init_adapter", str(adapter)], tmp_path)
    assert proc.returncode != 0
    errors = _errors(proc)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "truncated.safetensors: not a readable .safetensors file" in errors[0] and "process" not in errors[0]


def test_a_mistake_only_one_process_meets_names_it(tmp_path):
    """Process 1 alone fails (a plugin that refuses that process's machine); process 0 waits for it at the
    process group's start. The line is printed, once, saying which process."""
    (tmp_path / "rank_check.py").write_text(
        "import os\n"
        "from qwen_image.errors import UserError\n"
        "if os.environ.get('RANK') == '1':\n"
        "    raise UserError('this machine has no copy of the data folder')\n", encoding="utf-8")
    env = {**launch_env(), "QWEN_IMAGE_ALIGN_PLUGINS": str(tmp_path / "rank_check.py")}
    proc = _run([sys.executable, "-m", "align.cli", "sft", "--config", SFT, "--multi_gpu", "--num_processes", "2",
                 "--dataset_name", str(rated_images(tmp_path / "d")), "--output_dir", str(tmp_path / "o")],
                tmp_path, env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _errors(proc) == ["error: this machine has no copy of the data folder (on process 1 of 2, not the "
                             "others)"], proc.stderr[-3000:]
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()


def test_a_mistake_the_main_process_meets_while_encoding_stops_the_others_before_they_encode(tmp_path):
    """Process 0 encodes the data first (the others then read its cache); a prompt too long stops both processes
    there with one line, without process 1 starting the encoding over: it caches as much as a 1-process run does."""
    data = rated_images(tmp_path / "data", n=3)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[1]["prompt"] = "a sign " * 3000
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bars = {}
    for processes, launch in (("1", []), ("2", ["--multi_gpu"])):
        proc = _run([sys.executable, "-m", "align.cli", "sft", "--config", SFT, *launch, "--num_processes", processes,
                     "--dataset_name", str(data), "--output_dir", str(tmp_path / f"o{processes}")], tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = _errors(proc)
        assert len(errors) == 1 and "row 1 (file_name='1.png'): prompt is 6006 tokens" in errors[0], proc.stderr[-3000:]
        assert "process" not in errors[0]
        bars[processes] = proc.stderr.count("Caching text embeddings")
    assert bars["2"] == bars["1"] > 0, bars
