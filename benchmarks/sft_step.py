"""SFT step time: the trainer vs a bare forward+backward+AdamW loop on the same model and batch, and the bare loop
with cached embeddings/latents vs encoding text and images every step.

    python benchmarks/sft_step.py                       # tiny random model, CPU
    python benchmarks/sft_step.py --resolution 128 --steps 30
    python benchmarks/sft_step.py --model /models/Qwen-Image --resolution 1024 --batch 1   # GPU

Prints median seconds per optimizer step (after warm-up) and the ratios. Not a test: numbers vary by machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from align.losses import flow_matching_loss, make_noisy, sample_sigmas  # noqa: E402
from align.modeling import load_qwen_image, prepare_transformer  # noqa: E402
from align.trainers.base import release_text_encoder  # noqa: E402
from align.trainers.sft import SFTConfig, SFTTrainer, prepare_sft_data  # noqa: E402
from qwen_image import pack  # noqa: E402
from qwen_image.latents import img_shapes  # noqa: E402
from qwen_image.sampling import Conditioning, predict_velocity  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_data(folder: Path, n: int, res: int) -> list[tuple[Image.Image, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(folder / "metadata.jsonl", "w") as fh:
        for i in range(n):
            img = Image.fromarray((np.random.default_rng(i).random((res, res, 3)) * 255).astype(np.uint8))
            img.save(folder / f"{i}.png")
            prompt = f"a sign that says \"SALE {i}\" in bold letters"
            fh.write(json.dumps({"file_name": f"{i}.png", "prompt": prompt, "ratings": [5, 5, 5]}) + "\n")
            rows.append((img, prompt))
    return rows


def config(args, out: str, data: str) -> SFTConfig:
    return SFTConfig(output_dir=out, dataset_name=data, model_name_or_path=args.model, resolution=args.resolution,
                     per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
                     lr_scheduler_type="constant", logging_steps=10, save_strategy="no", report_to=[],
                     finetune=args.finetune, lora_rank=16, lora_alpha=16, timestep_sampling="logit_normal",
                     use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0,
                     gradient_checkpointing=args.gradient_checkpointing, bf16=torch.cuda.is_available())


def bare_loop(args, cfg: SFTConfig, rows, cached: bool) -> list[float]:
    """The floor: forward + backward + AdamW on one batch, nothing else (cached=False: encode every step too)."""
    qwen = load_qwen_image(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transformer = prepare_transformer(qwen, cfg).to(device)
    qwen.vae.to(device)
    if qwen.text_encoder is not None:
        qwen.text_encoder.to(device)
    # The Trainer's optimizer (transformers' default optim is adamw_torch_fused): compare like with like.
    opt = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-4,
                            weight_decay=cfg.weight_decay, fused=str(cfg.optim).endswith("fused"))
    images, prompts = [r[0] for r in rows[: args.batch]], [r[1] for r in rows[: args.batch]]
    res = args.resolution

    def encode():
        with torch.no_grad():
            x0 = pack(qwen.encode_images(images, res, res)).float()
            embeds, mask = qwen.encode_prompt(prompts)
        return x0, embeds, mask

    x0, embeds, mask = encode()
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        if not cached:
            x0, embeds, mask = encode()
        sigma = sample_sigmas(x0.shape[0], "logit_normal", generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        noisy, target = make_noisy(x0, noise, sigma)
        pred = predict_velocity(transformer, noisy.to(transformer.dtype), sigma, Conditioning.from_padded(embeds, mask),
                                img_shapes(x0.shape[0], res, res))
        loss = flow_matching_loss(pred, target, sigma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)  # the Trainer clips too (max_grad_norm 1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    return times


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.times.append(time.perf_counter() - self._t0)


def trainer_loop(cfg: SFTConfig) -> list[float]:
    qwen = load_qwen_image(cfg)
    data = prepare_sft_data(cfg, qwen)
    timer = StepTimer()
    trainer = SFTTrainer(qwen, cfg, data, callbacks=[timer])
    release_text_encoder(qwen)
    trainer.train()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local diffusers checkpoint (default: tiny random model)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--finetune", default="lora", choices=["lora", "full"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    with tempfile.TemporaryDirectory() as tmp:
        rows = write_data(Path(tmp) / "data", args.batch * 2, args.resolution)
        cfg = config(args, str(Path(tmp) / "out"), str(Path(tmp) / "data"))
        results = {
            "bare loop, cached": bare_loop(args, cfg, rows, cached=True),
            "SFTTrainer, cached": trainer_loop(cfg),
            "bare loop, encode every step": bare_loop(args, cfg, rows, cached=False),
        }
    med = {k: statistics.median(v[args.warmup:]) for k, v in results.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"SFT step time, {args.finetune}, {args.resolution}px, batch {args.batch}, {device}, "
          f"median of {args.steps - args.warmup} steps after {args.warmup} warm-up")
    for k, v in med.items():
        print(f"  {k:32s} {v * 1000:9.1f} ms/step")
    print(f"  trainer / bare loop               {med['SFTTrainer, cached'] / med['bare loop, cached']:9.3f}")
    print(f"  no caching / caching              {med['bare loop, encode every step'] / med['bare loop, cached']:9.3f}")
    for k, v in med.items():
        print(f"METRIC\tsft: {k}\t{v * 1000:.1f}\tms/step")
    print(f"METRIC\tsft: trainer / bare loop\t{med['SFTTrainer, cached'] / med['bare loop, cached']:.3f}\tratio")


if __name__ == "__main__":
    main()
