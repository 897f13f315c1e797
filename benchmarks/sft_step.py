"""SFT step time: ``SFTTrainer`` against a bare training loop written independently of it, and where the trainer's
extra time goes.

    python benchmarks/sft_step.py                                   # small-256: 4 layers, 4 heads x 32, 256 tokens
    python benchmarks/sft_step.py --layers 2 --heads 2 --head_dim 16 --resolution 128   # tiny-128
    python benchmarks/sft_step.py --profile                         # + cProfile of the trainer's steps
    python benchmarks/sft_step.py --uncached                        # + the bare loop encoding every step
    python benchmarks/sft_step.py --model /models/Qwen-Image --resolution 1024 --batch 1   # GPU

Both loops train the same LoRA (rank 4 on to_q/k/v/out.0 by default) of a random checkpoint saved in diffusers
layout, on cached latents, batch 2, AdamW with clipping at 1. The bare loop uses diffusers and PEFT directly (its
own noise, sigma and loss code): forward, backward, clip, step, nothing else. Runs alternate (trainer, bare,
trainer, ...) so machine load hits both alike; each run gives the median step time after warm-up, and the ratio is
the median over runs of the paired ratios.

Per loop it also prints the median time inside forward, backward, clipping and the optimizer step (measured with
the same hooks in both), and the rest of the step: data fetching, collation, sigma/noise, Trainer bookkeeping.
Not a test: numbers vary by machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import QwenImagePipeline  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

PARTS = ("forward", "backward", "clip", "optimizer")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PartTimer:
    """Wall time spent inside forward / backward / clip / optimizer, per step (synchronised on GPU)."""

    def __init__(self):
        self.current = dict.fromkeys(PARTS, 0.0)
        self.steps: list[dict[str, float]] = []

    @contextmanager
    def part(self, name: str):
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.current[name] += time.perf_counter() - t0

    def _hooks(self, name: str):
        """A (pre, post) pair of hooks that adds the time between them to ``name``."""
        state = {}

        def pre(*_):
            sync()
            state["t0"] = time.perf_counter()

        def post(*_):
            sync()
            self.current[name] += time.perf_counter() - state["t0"]

        return pre, post

    def watch_forward(self, module: torch.nn.Module) -> None:
        pre, post = self._hooks("forward")
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        pre, post = self._hooks("optimizer")
        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = dict.fromkeys(PARTS, 0.0)


def write_data(folder: Path, n: int, res: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    prompts = []
    with open(folder / "metadata.jsonl", "w") as fh:
        for i in range(n):
            img = Image.fromarray((np.random.default_rng(i).random((res, res, 3)) * 255).astype(np.uint8))
            img.save(folder / f"{i}.png")
            prompt = f"a sign that says \"SALE {i}\" in bold letters"
            fh.write(json.dumps({"file_name": f"{i}.png", "prompt": prompt, "ratings": [5, 5, 5]}) + "\n")
            prompts.append(prompt)
    return prompts


def write_checkpoint(args, folder: Path) -> str:
    from qwen_image import QwenImage

    d = args.head_dim
    QwenImage.tiny(seed=0, num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=d,
                   axes_dims_rope=(d // 4, 3 * d // 8, 3 * d // 8)).save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------------------------- the bare loop
def bare_run(args, model_path: str, prompts: list[str], images: list | None = None) -> tuple[list[float], list[dict]]:
    """The floor, from diffusers and PEFT only: cached x0 and prompt embeddings in memory; per step new sigma and
    noise, forward, the flow-matching MSE, backward, clip, AdamW step. With ``images``: encode the prompts and the
    images (VAE) again at every step instead (what caching saves)."""
    from peft import LoraConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = QwenImagePipeline.from_pretrained(model_path, torch_dtype=dtype).to(device)
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=args.targets))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    transformer.train()
    # transformers' default optim is adamw_torch_fused: the same here.
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompts[: args.batch], device=device)
    if mask is not None and bool(mask.all()):
        mask = None  # as the pipeline does: no attention mask when nothing is padding
    tokens = (args.resolution // 16) ** 2
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, tokens, 64, generator=g).to(device)
    shapes = [[(1, args.resolution // 16, args.resolution // 16)]] * args.batch
    timer = PartTimer()
    timer.watch_forward(transformer)
    timer.watch_optimizer(optimizer)
    if images is not None:
        from qwen_image import pack
        from qwen_image.latents import encode, images_to_tensor

    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        if images is not None:
            with torch.no_grad():
                embeds, mask = pipe.encode_prompt(prompts[: args.batch], device=device)
                pixels = images_to_tensor(images[: args.batch], args.resolution, args.resolution).to(device, dtype)
                x0 = pack(encode(pipe.vae, pixels)).float()
            if mask is not None and bool(mask.all()):
                mask = None
        sigma = torch.sigmoid(torch.randn(args.batch, generator=g)).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        s = sigma.view(-1, 1, 1)
        noisy = ((1 - s) * x0 + s * noise).to(dtype)
        pred = transformer(hidden_states=noisy, timestep=sigma.to(dtype), encoder_hidden_states=embeds,
                           encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False)[0]
        loss = ((pred.float() - (noise - x0)) ** 2).mean()
        with timer.part("backward"):
            loss.backward()
        with timer.part("clip"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        timer.end_step()
    return times, timer.steps


# ----------------------------------------------------------------------------------------------- the trainer
def sft_config(args, model_path: str, data: str, out: str):
    from align.configs.sft import SFTConfig

    return SFTConfig(output_dir=out, dataset_name=data, model_name_or_path=model_path, resolution=args.resolution,
                     cache_dir=str(Path(out).parent / "cache"),
                     per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
                     lr_scheduler_type="constant", logging_steps=10, save_strategy="no", report_to=[],
                     finetune="lora", lora_rank=args.rank, lora_alpha=args.rank, lora_target_modules=args.targets,
                     timestep_sampling="logit_normal", validation_prompts=[],
                     use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0,
                     bf16=torch.cuda.is_available())


class StepEnd(TrainerCallback):
    """Step time = time between consecutive step ends: includes fetching the batch, which Trainer does before
    on_step_begin."""

    def __init__(self, timer: PartTimer, profile: cProfile.Profile | None = None, warmup: int = 0):
        self.timer, self.times, self._last = timer, [], None
        self.profile, self.warmup = profile, warmup

    def on_train_begin(self, args, state, control, **kwargs):
        sync()
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        self.timer.end_step()
        if self.profile is not None and len(self.times) == self.warmup:
            self.profile.enable()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profile is not None:
            self.profile.disable()


def trainer_run(args, cfg, profile: cProfile.Profile | None = None) -> tuple[list[float], list[dict]]:
    from align.data.sft import prepare_sft_data
    from align.modeling import load_qwen_image, release_text_encoder
    from align.trainers.sft import SFTTrainer

    qwen = load_qwen_image(cfg)
    data = prepare_sft_data(cfg, qwen)  # encoded once, then read from the on-disk cache
    timer = PartTimer()
    step_end = StepEnd(timer, profile, args.warmup)
    trainer = SFTTrainer(qwen, cfg, data, callbacks=[step_end])
    release_text_encoder(qwen)
    trainer.create_optimizer_and_scheduler(num_training_steps=cfg.max_steps)
    timer.watch_forward(trainer.model)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    timer.watch_optimizer(inner)
    backward, clip = trainer.accelerator.backward, trainer.accelerator.clip_grad_norm_

    def timed_backward(*a, **k):
        with timer.part("backward"):
            return backward(*a, **k)

    def timed_clip(*a, **k):
        with timer.part("clip"):
            return clip(*a, **k)

    trainer.accelerator.backward, trainer.accelerator.clip_grad_norm_ = timed_backward, timed_clip
    trainer.train()
    return step_end.times, timer.steps


def summarize(times: list[float], parts: list[dict], warmup: int) -> dict[str, float]:
    out = {"step": statistics.median(times[warmup:])}
    for name in PARTS:
        out[name] = statistics.median(p[name] for p in parts[warmup:])
    out["outside"] = statistics.median(t - sum(p.values()) for t, p in zip(times[warmup:], parts[warmup:]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local diffusers checkpoint (default: a random one, below)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=256, help="px; (resolution/16)^2 image tokens")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", nargs="+", default=["to_q", "to_k", "to_v", "to_out.0"])
    parser.add_argument("--steps", type=int, default=12, help="steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=8, help="paired runs (trainer, bare) alternating")
    parser.add_argument("--uncached", action="store_true", help="also time the bare loop encoding text and images every step")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the trainer's steps after warm-up")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or write_checkpoint(args, Path(tmp) / "ckpt")
        prompts = write_data(Path(tmp) / "data", args.batch * 4, args.resolution)
        cfg = sft_config(args, model_path, str(Path(tmp) / "data"), str(Path(tmp) / "out"))
        trainer_runs, bare_runs, uncached_runs = [], [], []
        profile = cProfile.Profile() if args.profile else None
        for _ in range(args.runs):
            trainer_runs.append(summarize(*trainer_run(args, cfg, profile), args.warmup))
            bare_runs.append(summarize(*bare_run(args, model_path, prompts), args.warmup))
            if args.uncached:
                images = [Image.open(Path(tmp) / "data" / f"{i}.png").convert("RGB") for i in range(args.batch)]
                uncached_runs.append(summarize(*bare_run(args, model_path, prompts, images), args.warmup))
    ratio = statistics.median(t["step"] / b["step"] for t, b in zip(trainer_runs, bare_runs))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"SFT step, LoRA r{args.rank} on {' '.join(args.targets)}, {args.layers} layers, {args.heads} heads x "
          f"{args.head_dim}, {(args.resolution // 16) ** 2} image tokens ({args.resolution}px), batch {args.batch}, "
          f"{device}; medians of {args.runs} paired runs x {args.steps - args.warmup} steps")
    print(f"  {'ms per step':14s}" + "".join(f"{k:>10s}" for k in ("step", *PARTS, "outside")))
    rows = [("SFTTrainer", trainer_runs), ("bare loop", bare_runs)] + ([("bare, uncached", uncached_runs)] if uncached_runs else [])
    for label, runs in rows:
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"  {label:14s}" + "".join(f"{med[k] * 1000:10.2f}" for k in ("step", *PARTS, "outside")))
        print(f"METRIC\tsft: {label} step\t{med['step'] * 1000:.2f}\tms/step")
        print(f"METRIC\tsft: {label} outside forward/backward/clip/optimizer\t{med['outside'] * 1000:.2f}\tms/step")
    print(f"  trainer / bare loop (median of paired ratios) {ratio:.3f}")
    print(f"METRIC\tsft: trainer / bare loop\t{ratio:.3f}\tratio")
    if uncached_runs:
        saved = statistics.median(u["step"] / b["step"] for u, b in zip(uncached_runs, bare_runs))
        print(f"  encoding every step / cached (median of paired ratios) {saved:.3f}")
        print(f"METRIC\tsft: no caching / caching\t{saved:.3f}\tratio")
    if profile is not None:
        stream = io.StringIO()
        pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(25)
        print(stream.getvalue())


if __name__ == "__main__":
    main()
