"""Command line: ``python -m align.datatools synth|filter|rare|tiny-data ...`` (see docs/data-tools.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwen_image.errors import UserError


def _read_lines(path: str) -> list[str]:
    if not Path(path).is_file():
        raise UserError(f"--texts-file {path}: no such file")
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that already holds data, unless --overwrite (before any work is done)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists and is not empty: pass --overwrite to replace its "
                        f"metadata.jsonl, or choose another folder")


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a user mistake prints one ``error: ...`` line and returns 2."""
    try:
        return _main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.datatools", description=__doc__, allow_abbrev=False)
    p.error = _raise  # type: ignore[method-assign]  # one line, exit 2 (argparse would add its usage)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="render texts into an imagefolder (images + metadata.jsonl)")
    s.add_argument("--texts", nargs="*", default=[], help="texts to render")
    s.add_argument("--texts-file", help="a file with one text per line")
    s.add_argument("--out", required=True)
    s.add_argument("--modes", nargs="+", default=["plain", "scene", "template"], choices=["plain", "scene", "template"])
    s.add_argument("--size", type=int, nargs="+", default=[512], help="W [H]")
    s.add_argument("--per-text", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")

    r = sub.add_parser("rare", help="print strings built from characters rare in a corpus")
    r.add_argument("--corpus", required=True, help="a text file (e.g. all your captions)")
    r.add_argument("--max-count", type=int, default=1)
    r.add_argument("--all-cjk", action="store_true",
                   help="candidates = every CJK ideograph the font can draw (absent ones count 0)")
    r.add_argument("-n", type=int, default=20)
    r.add_argument("--min-len", type=int, default=2)
    r.add_argument("--max-len", type=int, default=6)
    r.add_argument("--seed", type=int, default=0)

    f = sub.add_parser("filter", help="filter an imagefolder; writes the kept rows as a new imagefolder + report")
    f.add_argument("--data-dir", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--min-side", type=int, default=256)
    f.add_argument("--max-aspect", type=float, default=3.0)
    f.add_argument("--min-blur-var", type=float, default=100.0)
    f.add_argument("--min-contrast", type=float, default=0.05)
    f.add_argument("--no-exposure", action="store_true")
    f.add_argument("--dup-distance", type=int, default=4)
    f.add_argument("--ocr", type=float, default=None, help="drop text images with OCR agreement below this")
    f.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (replaces its metadata.jsonl)")
    t = sub.add_parser("tiny-data", help="write the synthetic data a tiny recipe reads (recipes/tiny/*.yaml)")
    t.add_argument("kind", choices=["edit_sft", "pairs", "edit_pairs", "edit_prompts", "ratings"],  # tiny_data.KINDS
                   help="edit_sft: data/tiny_edit (edit_sft_lora.yaml); pairs: data/tiny_pairs (dpo_*.yaml); "
                        "edit_pairs: data/tiny_edit_pairs; edit_prompts: data/tiny_edit_prompts; "
                        "ratings: data/tiny_ratings (kto_lora.yaml)")
    t.add_argument("--out", help="the folder to write (default: the one the tiny recipes read, under the current "
                                 "folder)")
    t.add_argument("-n", type=int, default=None, help="rows (default: the recipe's usual amount)")
    t.add_argument("--size", type=int, default=None, help="image side in px (default 32; 64 for pairs)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    for sp in (s, r, f, t):
        sp.error = _raise  # type: ignore[method-assign]
        sp.allow_abbrev = False
    args = p.parse_args(argv)

    if args.cmd == "synth":
        from .imagefolder import synthesize_imagefolder

        texts = [t for t in args.texts if t.strip()] + (_read_lines(args.texts_file) if args.texts_file else [])
        if not texts:
            raise UserError("no texts to render: give non-empty --texts or a --texts-file with one text per line")
        if any(v <= 0 for v in args.size) or len(args.size) > 2:
            raise UserError(f"--size must be W or W H in positive pixels, got {args.size}")
        _check_out(Path(args.out), args.overwrite)
        size = tuple(args.size) if len(args.size) == 2 else (args.size[0], args.size[0])
        skipped = []
        out = synthesize_imagefolder(texts, args.out, modes=args.modes, size=size, seed=args.seed,
                                     per_text=args.per_text, overwrite=args.overwrite,
                                     on_skip=lambda t, m: skipped.append((t, m)))
        n = len((out / "metadata.jsonl").read_text(encoding="utf-8").splitlines())
        print(f"wrote {n} images to {out}" + (f"; skipped {len(skipped)} texts with missing glyphs" if skipped else ""))
        for t, m in skipped:
            print(f"  skipped {t!r}: no glyph for {''.join(m)!r}", file=sys.stderr)
    elif args.cmd == "tiny-data":
        from .tiny_data import default_out, write_tiny_data

        if args.n is not None and args.n < 1 or args.size is not None and (args.size < 16 or args.size % 16):
            raise UserError(f"-n {args.n} / --size {args.size}: need n >= 1 and a size that is a multiple of 16")
        out = Path(args.out or default_out(args.kind))
        _check_out(out, args.overwrite)
        folder = write_tiny_data(args.kind, out, n=args.n, size=args.size, seed=args.seed)
        print(f"wrote {args.kind} data to {folder}")
    elif args.cmd == "rare":
        from .rare_chars import cjk_characters, rare_characters, rare_strings

        if not Path(args.corpus).is_file():
            raise UserError(f"--corpus {args.corpus}: no such file")
        if not 1 <= args.min_len <= args.max_len:
            raise UserError(f"--min-len {args.min_len} / --max-len {args.max_len}: need 1 <= min-len <= max-len")
        corpus = Path(args.corpus).read_text(encoding="utf-8")
        cands = cjk_characters() if args.all_cjk else None
        chars = rare_characters(corpus, candidates=cands, max_count=args.max_count)
        if not chars:
            print("no rare characters at that threshold", file=sys.stderr)
            return 1
        for line in rare_strings(chars, args.n, args.min_len, args.max_len, seed=args.seed):
            print(line)
    else:
        import datasets

        from .filtering import filter_dataset
        from .image_filters import default_filters
        from .imagefolder import write_imagefolder

        data_dir, out = Path(args.data_dir), Path(args.out)
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir}: no such folder")
        if out.resolve() == data_dir.resolve():
            raise UserError("--out must differ from --data-dir (the input would be overwritten)")
        if args.max_aspect < 1:
            raise UserError(f"--max-aspect {args.max_aspect}: the long side over the short one, so >= 1 (1 = square "
                            f"only)")
        if args.dup_distance < 0:
            raise UserError(f"--dup-distance {args.dup_distance}: a Hamming distance, so >= 0 (0 = exact duplicates)")
        _check_out(out, args.overwrite)
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train")
        except Exception as err:  # no images, unreadable metadata.jsonl: datasets' own message, on one line
            raise UserError(f"--data-dir {data_dir}: not a readable imagefolder ({type(err).__name__}: "
                            f"{' '.join(str(err).split())[:200]})") from None
        overrides = {"resolution": {"min_side": args.min_side, "max_aspect_ratio": args.max_aspect},
                     "blur": {"min_variance": args.min_blur_var}, "contrast": {"min_contrast": args.min_contrast},
                     "duplicate": {"max_distance": args.dup_distance}}
        if args.no_exposure:
            overrides["exposure"] = None
        if args.ocr is not None:
            overrides["ocr_agreement"] = {"min_score": args.ocr}
        filters = default_filters(text_images=args.ocr is not None, **overrides)
        kept, report = filter_dataset(ds, filters, progress=True)
        if len(kept):
            write_imagefolder(kept, out, overwrite=args.overwrite)
        else:
            out.mkdir(parents=True, exist_ok=True)
            print("no rows kept: no imagefolder written", file=sys.stderr)
        (out / "filter_report.json").write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=1),
                                                encoding="utf-8")
        print(f"kept rows written to {out}; report in {out / 'filter_report.json'}")
    return 0


def _raise(message: str) -> None:
    raise UserError(message)


if __name__ == "__main__":
    sys.exit(main())
