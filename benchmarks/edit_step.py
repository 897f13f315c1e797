"""Edit SFT step time vs text-to-image SFT at the same target size: the references add tokens to every forward.

    python benchmarks/edit_step.py                                   # tiny random models, CPU
    python benchmarks/edit_step.py --resolution 128 --refs 2 --steps 20
    python benchmarks/edit_step.py --model /models/Qwen-Image --edit_model /models/Qwen-Image-Edit-2511 \\
        --resolution 1024 --batch 1 --gradient_checkpointing                                    # GPU

Both runs go through the SFT trainer on cached data (the same rows, the edit run adds ``--refs`` control images of
the target's size at ``--control_resolution``). Prints median seconds per optimizer step, the image-token counts
and the edit / T2I ratio. Not a test: numbers vary by machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from sft_step import PartTimer, StepEnd, sft_config, write_data  # noqa: E402

from align.data.sft import prepare_sft_data  # noqa: E402
from align.modeling import load_qwen_image, release_text_encoder  # noqa: E402
from align.trainers.sft import SFTTrainer  # noqa: E402


def add_controls(folder: Path, refs: int) -> None:
    """Turn the T2I rows into edit rows: the target's neighbours as control images, an edit instruction."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    names = [r["file_name"] for r in rows]
    keys = ["control_image", "control_image_1", "control_image_2"]
    for i, row in enumerate(rows):
        for k in range(refs):
            row[keys[k]] = names[(i + 1 + k) % len(names)]
        row["prompt"] = f'replace the text with "SALE {i}"'
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def timed_run(cfg) -> tuple[list[float], dict]:
    qwen = load_qwen_image(cfg)
    data = prepare_sft_data(cfg, qwen)
    step_end = StepEnd(PartTimer())
    trainer = SFTTrainer(qwen, cfg, data, callbacks=[step_end])
    release_text_encoder(qwen)
    batch = next(iter(trainer.get_train_dataloader()))
    refs = batch.get("references")
    tokens = {"target": int(batch["image_latents"].shape[1]), "text": int(batch["prompt_embeds"].shape[1]),
              "references": 0 if refs is None else int(refs.latents.shape[1])}
    trainer.train()
    return step_end.times, tokens


def edit_bench_config(args, model: str | None, data: str, out: str):
    """sft_step's trainer config (LoRA r4 on the attention projections) with this script's options."""
    cfg = sft_config(argparse.Namespace(**vars(args), rank=4, targets=["to_q", "to_k", "to_v", "to_out.0"]), model,
                     data, out)
    cfg.finetune, cfg.transformer_gradient_checkpointing = args.finetune, args.gradient_checkpointing
    return cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="T2I checkpoint (default: tiny random model)")
    parser.add_argument("--edit_model", default=None, help="edit checkpoint (default: tiny random Edit-2511 layout)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--control_resolution", type=int, default=0, help="0: the model's reference area")
    parser.add_argument("--refs", type=int, default=1, choices=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--finetune", default="lora", choices=["lora", "full"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    with tempfile.TemporaryDirectory() as tmp:
        t2i_dir, edit_dir = Path(tmp) / "t2i", Path(tmp) / "edit"
        write_data(t2i_dir, args.batch * 2, args.resolution)
        write_data(edit_dir, args.batch * 2, args.resolution)
        add_controls(edit_dir, args.refs)
        t2i_cfg = edit_bench_config(args, args.model, str(t2i_dir), str(Path(tmp) / "out_t2i"))
        edit_cfg = edit_bench_config(args, args.edit_model, str(edit_dir), str(Path(tmp) / "out_edit"))
        edit_cfg.control_resolution = args.control_resolution
        if args.edit_model is None:
            edit_cfg.tiny_variant = "edit-2511"
        t2i_times, t2i_tokens = timed_run(t2i_cfg)
        edit_times, edit_tokens = timed_run(edit_cfg)
    t2i = statistics.median(t2i_times[args.warmup:])
    edit = statistics.median(edit_times[args.warmup:])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"SFT step time, {args.finetune}, target {args.resolution}px, {args.refs} reference(s), batch {args.batch}, "
          f"{device}, median of {args.steps - args.warmup} steps after {args.warmup} warm-up")
    print(f"  T2I   {t2i * 1000:9.1f} ms/step   tokens: {t2i_tokens}")
    print(f"  edit  {edit * 1000:9.1f} ms/step   tokens: {edit_tokens}")
    print(f"  edit / T2I {edit / t2i:9.3f}")
    print(f"METRIC\tedit sft: T2I step\t{t2i * 1000:.1f}\tms/step")
    print(f"METRIC\tedit sft: edit step\t{edit * 1000:.1f}\tms/step")
    print(f"METRIC\tedit sft: edit / T2I\t{edit / t2i:.3f}\tratio")


if __name__ == "__main__":
    main()
