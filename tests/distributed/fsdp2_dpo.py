"""FSDP2 DPO steps on CPU (2 processes over gloo) with raw ``fully_shard``: Accelerate and the Trainer silently fall
back to DDP on CPU, so this drives the model side directly, with the trainer's own ``dpo_terms``. Run by
tests/test_dpo_distributed.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/fsdp2_dpo.py OUT_DIR lora|lora_bf16|full
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from align.export import save_full, save_lora
from align.modeling import add_lora
from align.reference import ReferenceModel, shard_transformer
from align.trainers.base import QwenImageTrainer
from align.trainers.dpo import FlowDPOTrainer
from qwen_image.latents import img_shapes
from qwen_image.sampling import Conditioning, predict_velocity
from qwen_image.scheduler import make_scheduler
from qwen_image.tiny import tiny_transformer

LORA = SimpleNamespace(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_init="gaussian", init_adapter=None,
                       lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                            "add_v_proj", "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                                            "txt_mlp.net.0.proj", "txt_mlp.net.2"])
ARGS = SimpleNamespace(beta=100.0, loss_type="sigmoid", timestep_sampling="logit_normal", logit_mean=0.0,
                       logit_std=1.0, mode_scale=1.29, w_dpo=1.0, beta_kl=0.1, w_sft=0.0, loss_weighting="none")


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randn(2, 4, 64, generator=g)  # 32x32 px -> 2x2 packed tokens
    return {"chosen_latents": chosen + 1.0, "rejected_latents": chosen - 1.0, "height": 32, "width": 32,
            "prompt_embeds": torch.randn(2, 5, 32, generator=g), "prompt_mask": None}


def main(out: str, mode: str) -> dict:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mode == "lora_bf16" else None
    finetune = "full" if mode == "full" else "lora"
    policy = tiny_transformer(seed=0)
    base = {n: p.detach().clone() for n, p in policy.named_parameters()}
    if finetune == "lora":
        add_lora(policy, LORA)  # LoRA before sharding
        with torch.no_grad():  # gaussian init keeps lora_B = 0 (adapters on == off): move it
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    else:
        policy.requires_grad_(True)
    reference = ReferenceModel.from_policy(policy, finetune)
    shard_transformer(policy, mesh=mesh, mp_policy=mp)
    reference.prepare(fsdp_mesh=mesh, mp_policy=mp)
    trainer = SimpleNamespace(args=ARGS, reference=reference, _model_dtype=None,
                              qwen=SimpleNamespace(transformer=policy, scheduler=make_scheduler(),
                                                   predict_velocity=predict_velocity, img_shapes=img_shapes))
    trainer.velocity = lambda *a, **k: QwenImageTrainer.velocity(trainer, *a, **k)

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for step in range(4):
        torch.manual_seed(100 * step + rank)  # each rank draws its own noise, on its own pairs
        terms, metrics = FlowDPOTrainer.dpo_terms(trainer, policy, batch(seed=10 * step + rank))
        loss = sum(w * v for w, v in terms.values() if w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"loss": loss.item(), "acc": metrics["rewards/accuracies"].item()})

    trainable = [p for p in policy.parameters() if p.requires_grad]
    result = {"rank": rank, "mode": reference.mode, "history": history,
              "policy_sharded": all(isinstance(p, DTensor) for p in policy.parameters()),
              "trainable_sharded": all(isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0]
                                       for p in trainable if p.shape[0] > 1),
              "class": type(policy).__name__}

    # Reference check on fixed inputs (collective: every rank runs it).
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 64, generator=g), torch.rand(2, generator=g)
    cond = Conditioning(torch.randn(2, 5, 32, generator=g), None)
    v_ref = reference.velocity(x, sigma, cond, img_shapes(2, 32, 32))
    with torch.no_grad():
        fresh = tiny_transformer(seed=0)
        if mp is not None:
            fresh = fresh.to(torch.bfloat16)
        v_base = predict_velocity(fresh, x.to(fresh.dtype), sigma, cond if mp is None else
                                  Conditioning(cond.embeds.bfloat16(), None), img_shapes(2, 32, 32))
    result["ref_vs_base"] = (v_ref.float() - v_base.float()).abs().max().item()

    # Gather before saving: a collective on all ranks; rank 0 gets plain full tensors.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_sd = get_model_state_dict(policy, options=options)
    if finetune == "full":
        ref_sd = get_model_state_dict(reference.module, options=options)
        result["ref_sharded"] = all(isinstance(p, DTensor) for p in reference.module.parameters())
        if rank == 0:
            result["ref_unchanged"] = all(torch.equal(ref_sd[n], base[n]) for n in base)
            result["policy_changed"] = sum(not torch.equal(full_sd[n], base[n]) for n in base)
    if rank == 0:
        if finetune == "lora":
            save_lora(policy, out, state_dict=full_sd)
        else:
            save_full(policy, out, state_dict=full_sd)
    return result


if __name__ == "__main__":
    out_dir, which = sys.argv[1:3]
    res = main(out_dir, which)
    with open(os.path.join(out_dir, f"result_rank{res['rank']}.json"), "w") as fh:
        json.dump(res, fh)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
