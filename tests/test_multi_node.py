"""Multi-node on one host: two "machines" (two ``accelerate launch --num_machines 2 --machine_rank 0|1`` processes
meeting at 127.0.0.1, CPU, gloo) train a tiny SFT LoRA to the same adapter as one machine with two processes. It is
what ``recipes/accelerate/multi_node.yaml`` does across real machines (docs/distributed.md)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_helpers import rated_images
from run_helpers import ROOT, launch_env
from safetensors.torch import load_file

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _training(data: Path, out: Path, cache: Path) -> list[str]:
    return [str(ROOT / "align/sft.py"), "--config", str(ROOT / "recipes/tiny/sft_lora.yaml"), "--dataset_name", str(data),
            "--output_dir", str(out), "--cache_dir", str(cache), "--max_steps", "3", "--per_device_train_batch_size", "1",
            "--learning_rate", "1e-2", "--caption_dropout", "0", "--aspect_ratio_buckets", "false",
            "--validation_prompts", "[]", "--logging_steps", "1", "--seed", "0"]


@pytest.mark.slow
def test_two_machines_on_localhost_train_what_one_machine_with_two_processes_trains(tmp_path):
    data = rated_images(tmp_path / "data")
    common = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2"]
    port = _free_port()
    machines = []
    for rank in (0, 1):
        # Each machine has its own encoding cache, as machines without a shared filesystem do.
        cmd = [*LAUNCH, *common, "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--rdzv_backend", "static",
               *_training(data, tmp_path / "two_machines", tmp_path / f"cache{rank}")]
        machines.append(subprocess.Popen(cmd, env=launch_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
    logs = [m.communicate(timeout=600) for m in machines]
    for m, (_, err) in zip(machines, logs):
        assert m.returncode == 0, err[-3000:]
    one = subprocess.run([*LAUNCH, *common, "--num_machines", "1", "--main_process_port", str(_free_port()),
                          *_training(data, tmp_path / "one_machine", tmp_path / "cache_one")],
                         env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    for run in ("two_machines", "one_machine"):
        summary = json.loads((tmp_path / run / "data_summary.json").read_text())
        assert summary["world_size"] == 2, (run, summary)
    two = load_file(tmp_path / "two_machines" / "pytorch_lora_weights.safetensors")
    single = load_file(tmp_path / "one_machine" / "pytorch_lora_weights.safetensors")
    assert two.keys() == single.keys()
    # lora_B starts at zero (PEFT): a non-zero one has trained
    assert any(float(two[k].abs().max()) > 0 for k in two if "lora_B" in k), "the adapter did not train"
    for key in two:
        torch.testing.assert_close(two[key], single[key], rtol=0, atol=0)
    history = [json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
               for run in ("two_machines", "one_machine")]
    losses = [[h["loss"] for h in hist if "loss" in h] for hist in history]
    assert len(losses[0]) == 3 and losses[0] == losses[1]

