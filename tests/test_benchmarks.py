"""The benchmark scripts run (numbers are printed, never asserted: speed is not a test)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_scale_skips_without_gpu_and_runs_a_reduced_config(capsys):
    gpu_scale = _load("gpu_scale")
    gpu_scale.main([])
    out = capsys.readouterr().out
    assert "20.43 B parameters" in out  # the real config, counted on the meta device
    assert "skipping" in out
    gpu_scale.main(["--allow_cpu", "--layers", "1", "--heads", "2", "--head_dim", "32", "--joint_dim", "64",
                    "--resolution", "32", "--text_len", "4", "--rollout_steps", "2", "--train_timesteps", "1",
                    "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    for row in ("LoRA SFT step", "Flow-DPO step", "GRPO step"):  # the trainers' own steps
        assert row in out
    assert out.count("METRIC\t") == 3


def test_edit_step_benchmark_prints_the_edit_over_t2i_ratio(capsys):
    edit_step = _load("edit_step")
    edit_step.main(["--steps", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    ratio = [line for line in out.splitlines() if line.startswith("METRIC\tedit sft: edit / T2I")]
    assert len(ratio) == 1 and float(ratio[0].split("\t")[2]) > 0
