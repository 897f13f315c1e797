"""DPO under the sharded backends on CPU, 2 processes over gloo. DDP through ``accelerate launch`` is in
test_dpo_trainer.py.

- FSDP2: Accelerate falls back to DDP on CPU, so the script shards the tiny transformer's blocks with raw
  ``fully_shard`` and runs the trainer's ``dpo_terms`` (LoRA with bf16 mixed precision; full fine-tune with a sharded
  frozen copy), gathering the weights before saving.
- ZeRO-3: through the Trainer (``align.dpo.main``) with a gloo PartialState; parameters really partitioned,
  for the policy and for the full fine-tune reference's own engine.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.data.preference import write_synthetic_pairs
from qwen_image.tiny import tiny_transformer

pytestmark = pytest.mark.slow  # processes / long runs: `-m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(script: str, *args: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           f"tests/distributed/{script}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((Path(args[0]) / f"result_rank{r}.json").read_text()) for r in range(2)]


def _assert_full_checkpoint_trained(folder: Path):
    from diffusers import QwenImageTransformer2DModel

    loaded = dict(QwenImageTransformer2DModel.from_pretrained(folder).named_parameters())
    base = dict(tiny_transformer(seed=0).named_parameters())
    assert loaded.keys() == base.keys()
    assert sum(not torch.equal(loaded[n], base[n]) for n in base) > 10


def _assert_full_lora(path: Path):
    layers = load_file(path)
    assert len(layers) == 48  # 12 targets x 2 blocks x (A, B), gathered to full shape
    assert all(v.shape[0] == 4 for k, v in layers.items() if "lora_A" in k)


@pytest.mark.parametrize("mode", ["lora_bf16", "full"])
def test_fsdp2_dpo_steps(mode, tmp_path):
    results = _torchrun("fsdp2_dpo.py", str(tmp_path), mode)
    for r in results:
        assert r["class"] == "FSDPQwenImageTransformer2DModel" and r["policy_sharded"] and r["trainable_sharded"]
        assert r["ref_vs_base"] == 0.0  # adapters-off / frozen copy == the base model, exactly
        assert r["history"][-1]["acc"] == 1.0 and r["history"][-1]["loss"] < r["history"][0]["loss"]
    if mode == "full":
        assert results[0]["mode"] == "copy" and results[0]["ref_sharded"] and results[0]["ref_unchanged"]
        assert results[0]["policy_changed"] > 10
        _assert_full_checkpoint_trained(tmp_path / "transformer")
    else:
        assert results[0]["mode"] == "adapter_off"
        _assert_full_lora(tmp_path / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def zero3_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("z3")
    return write_synthetic_pairs(root / "data", n=8, size=32), root / "cache"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed not installed (pip install --no-build-isolation deepspeed==0.19.8)")
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_zero3_dpo_through_trainer(finetune, zero3_pairs, tmp_path):
    data, cache = zero3_pairs
    results = _torchrun("zero3_dpo.py", str(tmp_path), str(data), str(cache), finetune)
    for r in results:
        assert r["world"] == 2 and r["engine"] == "DeepSpeedEngine" and r["distributed_type"].endswith("DEEPSPEED")
        # Really partitioned: every tensor is an empty placeholder and each rank holds half of the numbers.
        assert r["policy_partitioned"] and r["policy_slice_numel"] * 2 == r["policy_full_numel"]
        assert len(r["history"]) == 4 and r["history"][-1]["loss/dpo"] < r["history"][0]["loss/dpo"]
    assert results[0]["history"] == results[1]["history"]  # metrics are gathered over both ranks
    if finetune == "full":
        r = results[0]
        assert r["mode"] == "copy" and r["ref_engine"] == "DeepSpeedEngine" and r["ref_partitioned"]
        assert r["ref_unchanged"] and r["policy_changed"] > 10
        _assert_full_checkpoint_trained(tmp_path / "transformer")
    else:
        assert results[0]["mode"] == "adapter_off"
        assert results[0]["ref_vs_base"] == 0.0 and results[0]["policy_vs_base"] > 1e-4
        _assert_full_lora(tmp_path / "pytorch_lora_weights.safetensors")
