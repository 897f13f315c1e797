"""Training from pulled pairs, the report, and the command line (``python -m rewards.preference_model train``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from qwen_image.errors import UserError

from .model import PreferenceModel, fit_head
from .pairs import evaluate_pairs, read_pairs, split_pairs

__all__ = ["train_preference_model", "format_report", "build_parser", "main"]


def train_preference_model(pairs_source, backbone_path, output_dir, *, processor_path=None, use_text: bool = True,
                           hidden: int = 0, steps: int = 100, weight_decay: float = 1e-3,
                           heldout_fraction: float = 0.2, split: str = "prompt", seed: int = 0, ties: str = "half",
                           device: str = "cpu", batch_size: int = 16, overwrite: bool = False
                           ) -> tuple[PreferenceModel, dict]:
    """Read pairs, embed them once with the frozen backbone, fit the head on the train split, evaluate on the
    held-out split, save to ``output_dir``. Returns the trained model and the report (also in the saved config)."""
    import torch

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {out} exists and is not empty (use --overwrite)")
    if hidden < 0 or steps < 1 or weight_decay < 0:
        raise UserError(f"hidden must be >= 0, steps >= 1 and weight_decay >= 0 (got {hidden}, {steps}, "
                        f"{weight_decay})")
    pairs, counts = read_pairs(pairs_source, ties=ties)
    if len(pairs) < 4:
        raise UserError(f"only {len(pairs)} usable pairs in {pairs_source}: a held-out split needs at least 4")
    train_idx, held_idx, how = split_pairs(pairs, heldout_fraction, seed, split)
    model = PreferenceModel(backbone_path, processor_path=processor_path, use_text=use_text, device=device,
                            batch_size=batch_size)
    prompts = [p.prompt for p in pairs]
    feats = model.features(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    fc, fr = feats[:len(pairs)], feats[len(pairs):]
    tr = torch.tensor(train_idx)
    model.fitted = fit_head(fc[tr], fr[tr], [pairs[i].target for i in train_idx], hidden=hidden, steps=steps,
                            weight_decay=weight_decay, seed=seed)
    margins = [float(x) for x in model.fitted.scores(fc) - model.fitted.scores(fr)]
    report = {
        "data": counts, "split": how, "train_pairs": len(train_idx), "heldout_pairs": len(held_idx),
        "train": evaluate_pairs([pairs[i] for i in train_idx], [margins[i] for i in train_idx]),
        "heldout": evaluate_pairs([pairs[i] for i in held_idx], [margins[i] for i in held_idx]),
        "settings": {"hidden": hidden, "steps": steps, "weight_decay": weight_decay, "seed": seed,
                     "ties": ties, "heldout_fraction": heldout_fraction},
        "data_sha256": hashlib.sha256(json.dumps([[p.prompt, str(p.chosen), str(p.rejected), p.target]
                                                  for p in pairs]).encode()).hexdigest()[:16],
    }
    model.save(out, extra={"report": report})
    report["output_dir"] = str(out)
    return model, report


def format_report(report: dict) -> str:
    """The report as a few readable lines (what the CLI prints)."""
    d, h = report["data"], report["heldout"]
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"pairs: {d['used']} used of {d['rows']} rows ({d['pairs']} decided, {d['ties_half']} ties at 0.5; "
             f"dropped: {d['ties_dropped']} ties, {d['both_bad_dropped']} both bad, "
             f"{d['favour_rejected_dropped']} favouring rejected)"
             + (f"; dropped at pull: {d['dropped_at_pull']}" if d.get("dropped_at_pull") else ""),
             f"split by {report['split']}: {report['train_pairs']} train, {report['heldout_pairs']} held out",
             f"train accuracy vs majority: {fmt(report['train']['accuracy'])}",
             f"held-out accuracy vs majority: {fmt(h['accuracy'])} ({h['n']} pairs)"]
    if h["per_rater"]:
        lines.append("held-out, per rater: model agrees with the rater | the rater agrees with the others' majority "
                     "(ceiling) | the model agrees with the others' majority")
        for r, m in h["per_rater"].items():
            lines.append(f"  rater {r}: {fmt(m['model_vs_rater'])} ({m['n']} pairs) | "
                         f"{fmt(m['rater_vs_others'])} | {fmt(m['model_vs_others'])} ({m['n_others']} pairs)")
    else:
        lines.append("no per-rater votes in the data (pull writes them as raters / rater_choices): no ceiling")
    lines.append(f"saved to {report['output_dir']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rewards.preference_model",
                                 description="Train a Bradley-Terry preference reward model from raters' pairs.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the head on pulled pairs, report held-out accuracy, save")
    p.add_argument("--pairs", required=True, help="a pulled pairs folder (metadata.jsonl) or a .jsonl file")
    p.add_argument("--backbone", required=True, help="local CLIP-family model folder (never downloaded)")
    p.add_argument("--processor", help="processor folder (default: the backbone folder)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--hidden", type=int, default=0, help="hidden units of the head (0: linear; default %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="full-batch L-BFGS iterations (default %(default)s)")
    p.add_argument("--weight_decay", type=float, default=1e-3)
    p.add_argument("--heldout_fraction", type=float, default=0.2)
    p.add_argument("--split", choices=["prompt", "pair"], default="prompt",
                   help="hold out whole prompts (default) or single pairs")
    p.add_argument("--ties", choices=["half", "drop"], default="half", help="ties as 0.5 targets or dropped")
    p.add_argument("--image_only", action="store_true", help="ignore the prompt (image features only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _, report = train_preference_model(
            args.pairs, args.backbone, args.output_dir, processor_path=args.processor, use_text=not args.image_only,
            hidden=args.hidden, steps=args.steps, weight_decay=args.weight_decay,
            heldout_fraction=args.heldout_fraction, split=args.split, seed=args.seed, ties=args.ties,
            device=args.device, batch_size=args.batch_size, overwrite=args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
