"""Flow-GRPO costs: rollouts/s (SDE sampling + VAE decode + reward) and the time of one update (re-scoring the
trained steps with grad, backward, AdamW) with the full trajectory vs an SDE window (Flow-GRPO-Fast).

    python benchmarks/grpo_step.py                              # tiny random model, CPU
    python benchmarks/grpo_step.py --resolution 64 --batch 8 --cfg 4
    python benchmarks/grpo_step.py --model /models/Qwen-Image --resolution 512 --batch 4 --cfg 4   # GPU

Prints medians over --repeats after one warm-up. Not a test: numbers vary by machine. Then a short tiny GRPO run
shows the brightness reward rising (--learning 0 skips it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from align.losses import group_advantages, grpo_clip_loss, num_train_timesteps
from align.rl.rollouts import generate_rollouts, recompute_log_prob, score_images
from qwen_image import QwenImage
from rewards import get_reward

PROMPTS = ["a lighthouse at dusk", "a shop sign that says \"OPEN\"", "a red cat on a sofa", "a bowl of fruit"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_iteration(qwen: QwenImage, args, window: tuple[int, int] | None, reward, opt, rep: int) -> tuple[float, float, int]:
    """(seconds for the rollouts + rewards, seconds for one update, trained steps)."""
    device = qwen.device
    transformer = qwen.transformer
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    _sync(device)
    t = time.perf_counter()
    batch = generate_rollouts(qwen, transformer, prompts, height=args.resolution, width=args.resolution,
                              num_inference_steps=args.steps, noise_level=args.noise_level, sde_window=window,
                              true_cfg_scale=args.cfg, seeds=list(range(rep * 100, rep * 100 + args.batch)),
                              generator=torch.Generator().manual_seed(rep))
    totals, _ = score_images(reward, batch.prompts, batch.images)
    _sync(device)
    roll = time.perf_counter() - t
    batch.advantages = group_advantages(totals, args.batch)
    trained = batch.sde_steps[: num_train_timesteps(len(batch.sde_steps), args.timestep_fraction)]
    t = time.perf_counter()
    losses = [grpo_clip_loss(recompute_log_prob(transformer, batch, j).log_prob, batch.log_probs[:, j].to(device),
                             batch.advantages.to(device), 1e-4)[0] for j in trained]
    torch.stack(losses).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    return roll, time.perf_counter() - t, len(trained)


def learning_demo(max_steps: int) -> None:
    from align.grpo import main

    root = Path(__file__).resolve().parents[1]
    with __import__("tempfile").TemporaryDirectory() as out:
        trainer = main(["--config", str(root / "recipes/tiny/grpo_brightness.yaml"), "--output_dir", out,
                        "--max_steps", str(max_steps), "--disable_tqdm", "true", "--log_level", "warning"])
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print(f"tiny GRPO on brightness, {max_steps} steps x 8 rollouts: reward {rewards[0]:.4f} -> {rewards[-1]:.4f} "
          f"(per step: {', '.join(f'{r:.3f}' for r in rewards)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="local diffusers checkpoint (default: tiny random model)")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="num_inference_steps of a rollout")
    ap.add_argument("--window", type=int, default=2, help="sde_window_size of the Fast variant")
    ap.add_argument("--timestep_fraction", type=float, default=0.99)
    ap.add_argument("--noise_level", type=float, default=0.7)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--learning", type=int, default=10, help="steps of the tiny learning demo (0: skip)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        qwen = QwenImage.from_pretrained(args.model, torch_dtype="bfloat16", device=device)
    else:
        qwen = QwenImage.tiny(seed=0)
        if device != "cpu":
            qwen.to(device)
    qwen.transformer.requires_grad_(False)
    qwen.transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    cast_training_params(qwen.transformer, torch.float32)
    reward = get_reward("brightness")
    print(f"device {device}, {'tiny' if not args.model else args.model}, {args.resolution}px, batch {args.batch}, "
          f"{args.steps} steps, CFG {args.cfg}, torch threads {torch.get_num_threads()}")
    print(f"{'mode':<22}{'rollouts/s':>12}{'update s':>12}{'trained steps':>15}")
    modes = {"full trajectory": None, f"SDE window {args.window}": (0, args.window)}
    opt = torch.optim.AdamW([p for p in qwen.transformer.parameters() if p.requires_grad], lr=1e-4)
    times: dict[str, list] = {m: [] for m in modes}
    for rep in range(args.repeats + 1):  # modes interleaved so machine load hits both alike; repeat 0 warms up
        for name, window in modes.items():
            out = one_iteration(qwen, args, window, reward, opt, rep)
            if rep:
                times[name].append(out)
    upd = {}
    for name, rows in times.items():
        rps = statistics.median(args.batch / r[0] for r in rows)
        upd[name] = statistics.median(r[1] for r in rows)
        print(f"{name:<22}{rps:>12.2f}{upd[name]:>12.3f}{rows[0][2]:>15}")
        print(f"METRIC\tgrpo {name}: rollouts/s\t{rps:.2f}\timages/s")
        print(f"METRIC\tgrpo {name}: update ({rows[0][2]} trained steps)\t{upd[name]:.3f}\ts")
    full, fast = upd.values()
    print(f"update speed-up with the window: {full / fast:.1f}x (rollouts cost the same: every step is one forward)")
    if args.learning and not args.model:
        learning_demo(args.learning)


if __name__ == "__main__":
    main()
