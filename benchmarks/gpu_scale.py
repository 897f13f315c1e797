"""The REAL Qwen-Image transformer config (60 blocks, 24x128 heads, 20.4 B params) with random weights in bf16:
seconds per iteration and peak GPU memory of the trainers' own LoRA SFT, Flow-DPO and Flow-GRPO steps at 1024^2.

    python benchmarks/gpu_scale.py                          # needs a GPU (~80 GB); skips cleanly on CPU
    python benchmarks/gpu_scale.py --resolution 1328 --rank 64 --modes sft dpo
    python benchmarks/gpu_scale.py --allow_cpu --layers 1 --heads 2 --head_dim 32 --joint_dim 64 --resolution 64  # smoke
    python benchmarks/gpu_scale.py --base_storage nf4 --optim adamw8bit           # the low-VRAM options (docs/low-vram.md)
    python benchmarks/gpu_scale.py --base_storage fp8 --weight_streaming blocks --resident_blocks 8

Each step is the trainer's: ``SFTTrainer`` / ``FlowDPOTrainer`` / ``GRPOTrainer.training_step`` (GRPO: rollout of a
generation batch with the SDE sampler and true CFG, then the per-timestep backward over ``--train_timesteps``
trained steps) followed by the optimizer step, on a bundle built like ``align.modeling.load_qwen_image`` builds it
(base storage, LoRA, checkpointing, streaming). Inputs are what the trainers see after caching: packed latents
(B, (res/16)^2, 64) and text embeddings (B, text_len, 3584); random prompt embeddings in the prompt cache stand in
for the 8 B text encoder (released before training in real runs), and the tiny VAE decodes the rollouts for the
brightness reward (the real VAE only adds its decode time). Not a test: numbers depend on the machine. Each mode
resets the peak-memory counter; base weights are shared.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import QwenImageTransformer2DModel  # noqa: E402

from align import memory as estimator  # noqa: E402
from align.configs import DEFAULT_LORA_TARGETS  # noqa: E402
from align.launch import parse_config  # noqa: E402
from align.lowvram import BASE_STORAGES  # noqa: E402
from align.modeling import apply_storage  # noqa: E402
from qwen_image import QwenImage  # noqa: E402
from qwen_image.tiny import tiny_vae  # noqa: E402
from qwen_image.tokenizer import load_bundled_tokenizer  # noqa: E402

PROMPTS = ["a poster that says \"SALE\"", "a red cat", "a neon sign", "a bowl of fruit"]
MODES = ("sft", "dpo", "grpo")


def real_param_count() -> float:
    with torch.device("meta"):
        model = QwenImageTransformer2DModel()
    return sum(p.numel() for p in model.parameters()) / 1e9


def _config_overrides(args) -> dict:
    kwargs = {}
    if args.layers:
        kwargs["num_layers"] = args.layers
    if args.heads:
        kwargs.update(num_attention_heads=args.heads)
    if args.head_dim:
        kwargs.update(attention_head_dim=args.head_dim, axes_dims_rope=_axes(args.head_dim))
    if args.joint_dim:
        kwargs.update(joint_attention_dim=args.joint_dim)
    return kwargs


def build_bundle(args, device: torch.device, dtype: torch.dtype) -> QwenImage:
    """A QwenImage bundle around a random transformer of the real (or a reduced) config."""
    torch.manual_seed(0)
    with torch.device(device):
        transformer = QwenImageTransformer2DModel(**_config_overrides(args))
    transformer = transformer.to(dtype)
    # The text encoder is released before training in every trainer: its embeddings live in the prompt cache.
    qwen = QwenImage(transformer=transformer, vae=tiny_vae(0).to(device), text_encoder=torch.nn.Identity(),
                     tokenizer=load_bundled_tokenizer(), default_size=args.resolution)
    g = torch.Generator().manual_seed(2)
    joint = transformer.config.joint_attention_dim
    for prompt in [*PROMPTS, " "]:
        qwen.prompt_encoder._cache[prompt] = torch.randn(args.text_len, joint, generator=g).to(dtype)
    qwen.prompt_encoder.cache_size = len(PROMPTS) + 8
    return qwen


def trainer_config(cls, args, device: torch.device, extra: list[str]):
    argv = ["--output_dir", tempfile.mkdtemp(prefix="gpu_scale_"), "--report_to", "none", "--finetune", "lora",
            "--lora_rank", str(args.rank), "--lora_alpha", str(args.rank), "--resolution", str(args.resolution),
            "--per_device_train_batch_size", str(args.batch), "--gradient_checkpointing", str(not args.no_grad_ckpt),
            "--base_storage", args.base_storage, "--use_bnb_nested_quant", str(args.nested),
            "--weight_streaming", args.weight_streaming, "--resident_blocks", str(args.resident_blocks),
            "--optim", "adamw_8bit" if args.optim == "adamw8bit" else "adamw_torch", "--learning_rate", "1e-5",
            "--model_dtype", "bfloat16" if device.type == "cuda" else "float32", "--save_strategy", "no",
            "--lora_target_modules", *DEFAULT_LORA_TARGETS, *extra]
    if device.type != "cuda":
        argv += ["--use_cpu", "true"]
    return parse_config(cls, argv)


def latent_inputs(args, qwen: QwenImage, batch: int, device, dtype, columns: tuple[str, ...]) -> dict:
    seq = (args.resolution // 16) ** 2
    g = torch.Generator().manual_seed(1)
    out = {c: torch.randn(batch, seq, 64, generator=g).to(device, dtype) for c in columns}
    out["prompt_embeds"] = torch.randn(batch, args.text_len, qwen.transformer.config.joint_attention_dim,
                                       generator=g).to(device, dtype)
    out["prompt_mask"] = torch.ones(batch, args.text_len, dtype=torch.long, device=device)
    out["height"] = out["width"] = args.resolution
    return out


def _stored_bundle(args, device, dtype, config) -> QwenImage:
    qwen = build_bundle(args, device, dtype)
    apply_storage(qwen, config)
    return qwen


def make_trainer(mode: str, args, device, dtype):
    """(trainer, step function): one micro-step of the trainer + its optimizer step, on a fresh bundle stored as
    ``align.modeling.load_qwen_image`` stores it for the config."""
    from datasets import Dataset

    from align.configs.dpo import DPOConfig
    from align.configs.grpo import GRPOConfig
    from align.configs.sft import SFTConfig
    from align.data.report import RowReport
    from align.data.sft import SFTData
    from align.trainers.dpo import FlowDPOTrainer
    from align.trainers.grpo import GRPOTrainer
    from align.trainers.sft import SFTTrainer
    from rewards import brightness

    if mode == "sft":
        config = trainer_config(SFTConfig, args, device, ["--timestep_sampling", "logit_normal",
                                                          "--dataset_name", "in-memory"])  # batches are built here
        qwen = _stored_bundle(args, device, dtype, config)
        data = SFTData(dataset=Dataset.from_dict({"unit": [0]}), pools={}, summary=RowReport(), empty_prompt=None)
        trainer = SFTTrainer(qwen, config, data)
        inputs = latent_inputs(args, qwen, args.batch, device, dtype, (f"{config.image_column}_latents",))
    elif mode == "dpo":
        config = trainer_config(DPOConfig, args, device, ["--timestep_sampling", "logit_normal",
                                                          "--dataset_name", "in-memory"])
        qwen = _stored_bundle(args, device, dtype, config)
        trainer = FlowDPOTrainer(qwen, config)
        inputs = latent_inputs(args, qwen, args.batch, device, dtype, ("chosen_latents", "rejected_latents"))
    else:
        fraction = min(1.0, args.train_timesteps / args.rollout_steps + 1e-6)
        config = trainer_config(GRPOConfig, args, device, [
            "--num_generations", "2", "--gradient_accumulation_steps", "2", "--num_inference_steps",
            str(args.rollout_steps), "--timestep_fraction", str(fraction), "--true_cfg_scale", "4.0",
            "--reward_funcs", "brightness", "--num_images_to_log", "0"])
        qwen = _stored_bundle(args, device, dtype, config)
        trainer = GRPOTrainer(qwen, config, train_dataset=Dataset.from_dict({"prompt": PROMPTS}), reward_fn=brightness)
        inputs = {}
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1

    def step():
        trainer.training_step(trainer.model, dict(inputs))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return trainer, step


def _axes(head_dim: int) -> tuple[int, int, int]:
    # the real split is (16, 56, 56) of 128; keep its proportions and even sizes
    f = max(2, head_dim // 8 // 2 * 2)
    rest = head_dim - f
    return (f, rest // 2 // 2 * 2, rest - rest // 2 // 2 * 2)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, steps: int, warmup: int) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def build_bundle_meta(args) -> torch.nn.Module:
    with torch.device("meta"):
        return QwenImageTransformer2DModel(**_config_overrides(args))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="images (SFT, GRPO) or pairs (DPO) per step")
    ap.add_argument("--text_len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rollout_steps", type=int, default=10, help="SDE steps of a GRPO rollout")
    ap.add_argument("--train_timesteps", type=int, default=2, help="GRPO steps trained per update (an SDE window)")
    ap.add_argument("--no_grad_ckpt", action="store_true")
    ap.add_argument("--base_storage", default="none", choices=BASE_STORAGES, help="frozen block weights (align's base_storage)")
    ap.add_argument("--nested", action="store_true", help="nf4 with nested (double) quantisation")
    ap.add_argument("--weight_streaming", default="none", choices=("none", "blocks"))
    ap.add_argument("--resident_blocks", type=int, default=0)
    ap.add_argument("--optim", default="adamw", choices=("adamw", "adamw8bit"))
    ap.add_argument("--layers", type=int, default=0, help="0 = the real 60; fewer for a smoke run")
    ap.add_argument("--heads", type=int, default=0)
    ap.add_argument("--head_dim", type=int, default=0)
    ap.add_argument("--joint_dim", type=int, default=0)
    ap.add_argument("--allow_cpu", action="store_true", help="run without a GPU (use a reduced config)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line of results")
    args = ap.parse_args(argv)

    if args.resolution % 16:
        ap.error(f"--resolution must be a multiple of 16, got {args.resolution}")
    if (args.base_storage != "none" or args.weight_streaming != "none") and args.no_grad_ckpt:
        ap.error("a quantised or streamed base needs gradient checkpointing (without it backward keeps full-precision weight copies)")
    print(f"real Qwen-Image transformer config: {real_param_count():.2f} B parameters")
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no GPU here: skipping the 20B measurements (run on a GPU machine; --allow_cpu for a reduced smoke run)")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = sum(p.numel() for p in build_bundle_meta(args).parameters()) / 1e9
    print(f"benchmarking {n:.2f} B params on {device} {dtype}; {args.resolution}px = "
          f"{(args.resolution // 16) ** 2} image tokens, text {args.text_len}, batch {args.batch}, LoRA r={args.rank}, "
          f"grad ckpt {'off' if args.no_grad_ckpt else 'on'}, base {args.base_storage}{' nested' if args.nested else ''}, "
          f"streaming {args.weight_streaming} ({args.resident_blocks} resident), optimizer {args.optim}")
    results = {}
    names = {"sft": "LoRA SFT step", "dpo": "Flow-DPO step",
             "grpo": f"GRPO step (2x{args.batch} rollouts, {args.rollout_steps} SDE steps + {args.train_timesteps} trained)"}
    for mode in MODES:
        if mode not in args.modes:
            continue
        t = time.perf_counter()
        trainer, step = make_trainer(mode, args, device, dtype)
        print(f"{mode}: trainer built in {time.perf_counter() - t:.1f} s", flush=True)
        results[names[mode]] = measure(step, device, args.steps, args.warmup)
        del trainer, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    estimates = {}
    if not any((args.layers, args.heads, args.head_dim, args.joint_dim)):  # the real config: the estimate applies
        for name, objective in (("LoRA SFT step", "sft"), ("Flow-DPO step", "dpo"), ("GRPO step", "grpo")):
            est = estimator.estimate(estimator.Options(
                objective=objective, base_storage=args.base_storage, nested=args.nested, weight_streaming=args.weight_streaming,
                resident_blocks=args.resident_blocks, optimizer_8bit=args.optim == "adamw8bit", lora_rank=args.rank,
                lora_targets=tuple(DEFAULT_LORA_TARGETS), resolution=args.resolution, batch=args.batch, grpo_batch=args.batch,
                text_tokens=args.text_len, gradient_checkpointing=not args.no_grad_ckpt))
            # the benchmark holds no VAE and no CUDA-context share in max_memory_allocated
            estimates[name] = est.training_gib - est.parts.get("VAE", 0) - est.parts["context"]
    print(f"{'step':<64}{'s/it':>10}{'peak GiB':>12}{'estimate':>10}")
    for name, (sec, peak) in results.items():
        est = next((v for k, v in estimates.items() if name.startswith(k)), float("nan"))
        print(f"{name:<64}{sec:>10.3f}{peak:>12.2f}{est:>10.2f}")
        print(f"METRIC\t20B {args.resolution}px: {name}\t{sec:.3f}\ts/it (peak {peak:.2f} GiB)")
    if args.json:
        print(json.dumps({k: {"s_per_it": v[0], "peak_gib": v[1]} for k, v in results.items()}))


if __name__ == "__main__":
    main()
