"""DeepSpeed ZeRO-3 DPO through the Trainer on CPU (2 processes over gloo). Run by tests/test_dpo_distributed.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/zero3_dpo.py OUT_DIR DATA_DIR CACHE_DIR lora|full

A gloo PartialState must exist before the Trainer (transformers drops the backend on its DeepSpeed branch, and
both ranks would otherwise think they are rank 0 of 1); ``use_configured_state`` makes the Trainer reuse it.
"""

import json
import os
import sys

os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"

from accelerate import PartialState  # noqa: E402

state = PartialState(backend="gloo")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from align.dpo import main  # noqa: E402
from qwen_image.tiny import tiny_transformer  # noqa: E402


def run(out: str, data: str, cache: str, finetune: str) -> dict:
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "zero_force_ds_cpu_optimizer": False,
    }
    trainer = main([
        "--config", f"recipes/tiny/dpo_{finetune}.yaml", "--dataset_name", data, "--cache_dir", cache,
        "--output_dir", out, "--max_steps", "4", "--per_device_train_batch_size", "2", "--eval_strategy", "no",
        "--eval_fraction", "0", "--logging_steps", "1", "--use_cpu", "false",
        "--deepspeed", json.dumps(ds_config), "--accelerator_config", json.dumps({"use_configured_state": True}),
    ])
    engine = trainer.model_wrapped
    policy = trainer.accelerator.unwrap_model(trainer.model)
    # "Really partitioned": each rank holds an empty placeholder plus its own slice of every tensor.
    local = {n: (tuple(p.shape), tuple(p.ds_shape), p.ds_tensor.numel()) for n, p in policy.named_parameters()}
    result = {
        "rank": dist.get_rank(), "world": dist.get_world_size(), "engine": type(engine).__name__,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "policy_partitioned": all(s == (0,) for s, _, _ in local.values()),
        "policy_slice_numel": sum(n for _, _, n in local.values()),
        "policy_full_numel": sum(int(torch.Size(d).numel()) for _, d, _ in local.values()),
        "history": [h for h in trainer.state.log_history if "loss/dpo" in h],
        "mode": trainer.reference.mode,
    }
    base = dict(tiny_transformer(seed=0).named_parameters())
    if finetune == "full":
        ref = trainer.reference.module  # its own DeepSpeed engine
        result["ref_engine"] = type(ref).__name__
        ref_params = dict(ref.module.named_parameters())
        result["ref_partitioned"] = all(p.shape == (0,) for p in ref_params.values())
        with deepspeed.zero.GatheredParameters(list(ref_params.values())):
            result["ref_unchanged"] = all(torch.equal(p.data, base[n]) for n, p in ref_params.items())
        pol = dict(policy.named_parameters())
        with deepspeed.zero.GatheredParameters(list(pol.values())):
            result["policy_changed"] = sum(not torch.equal(p.data, base[n]) for n, p in pol.items())
    if finetune == "lora":
        # The adapters-off reference under ZeRO-3 is still exactly the base model (lora_B has moved by now).
        from qwen_image.latents import img_shapes
        from qwen_image.sampling import Conditioning, predict_velocity

        g = torch.Generator().manual_seed(0)
        x, sigma = torch.randn(2, 4, 64, generator=g), torch.rand(2, generator=g)
        cond = Conditioning(torch.randn(2, 5, 32, generator=g), None)
        v_ref = trainer.reference.velocity(x, sigma, cond, img_shapes(2, 32, 32))
        with torch.no_grad():
            v_base = predict_velocity(tiny_transformer(seed=0), x, sigma, cond, img_shapes(2, 32, 32))
            v_pol = predict_velocity(policy, x, sigma, cond, img_shapes(2, 32, 32))
        result["ref_vs_base"] = (v_ref - v_base).abs().max().item()
        result["policy_vs_base"] = (v_pol - v_base).abs().max().item()
    return result


if __name__ == "__main__":
    out, data, cache, finetune = sys.argv[1:5]
    result = run(out, data, cache, finetune)
    with open(os.path.join(out, f"result_rank{result['rank']}.json"), "w") as fh:
        json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
