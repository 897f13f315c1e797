"""``qwen-image-annotation`` / ``python -m annotation``: the Label Studio preference-collection bridge.

Connection for every command that talks to the server: ``--url`` (or LABEL_STUDIO_URL) and the API token from
LABEL_STUDIO_API_KEY or ``--token-file`` (never a plain flag, so it stays out of shell history and ``ps``).
Errors print one line ``error: ...`` on stderr and exit 2 (a bad option, a missing file, an unreachable
server, a rejected token); an unexpected failure exits 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from .errors import AnnotationError, install_log_redaction, redact

log = logging.getLogger("annotation")


def _connection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server connection")
    g.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL", "http://127.0.0.1:8080"),
                   help="Label Studio URL (env LABEL_STUDIO_URL; default %(default)s)")
    g.add_argument("--token-file", help="file holding the API token (default: env LABEL_STUDIO_API_KEY)")
    g.add_argument("--retries", type=int, default=4, help="retries on transient HTTP errors (default %(default)s)")
    g.add_argument("--backoff", type=float, default=0.5, help="first retry delay in s, doubled each time")
    g.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout in s (default %(default)s)")


def _client(args):
    from .client import LabelStudioClient, check_url, resolve_token
    check_url(args.url)  # a malformed URL fails at once instead of after the connection retries
    return LabelStudioClient(args.url, resolve_token(args.token_file), retries=args.retries,
                             backoff=args.backoff, timeout=args.timeout)


def _push_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("jsonl", type=Path, help=f"{what} JSONL written by generate-pairs (paths relative to it)")
    p.add_argument("--title", help="project title: reused if a project with it exists, else created")
    p.add_argument("--project-id", type=int, help="push into this existing project")
    p.add_argument("--raters", type=int, default=3, help="annotators per task (maximum_annotations, overlap 100%%)")
    p.add_argument("--image-mode", choices=["local-files", "url"], default="local-files",
                   help="local-files: served by Label Studio from --document-root; url: --url-prefix + path")
    p.add_argument("--document-root", type=Path, default=os.environ.get("LOCAL_FILES_DOCUMENT_ROOT"),
                   help="the server's LOCAL_FILES_DOCUMENT_ROOT (env LOCAL_FILES_DOCUMENT_ROOT)")
    p.add_argument("--storage-root", type=Path,
                   help="folder holding the images (default: the JSONL's folder); no image may lie outside it")
    p.add_argument("--url-prefix", help="URL prefix for --image-mode url")
    ins = p.add_mutually_exclusive_group()
    ins.add_argument("--instructions", help="what a new rater reads once before the first task (what 'better' "
                                            "means for this project; HTML allowed); replaces a reused project's")
    ins.add_argument("--instructions-file", type=Path, help="the same, read from a file")
    _connection(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen-image-annotation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("server", help="start a local Label Studio server (from its own venv) and wait",
                       description="Start Label Studio from its own virtualenv with a data dir, an admin user "
                                   "and an API token (SQLite by default), wait for /health, print the URL. "
                                   "The token and password are written to DATA_DIR/admin_token and "
                                   "DATA_DIR/admin_password (mode 600), never printed.")
    p.add_argument("--data-dir", type=Path, required=True, help="LABEL_STUDIO_BASE_DATA_DIR (database, uploads)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s)")
    p.add_argument("--venv", help="server virtualenv (env LABEL_STUDIO_VENV; "
                                  "default ~/.cache/qwen-image-align/labelstudio-venv)")
    p.add_argument("--document-root", type=Path, help="enable local-files serving below this folder")
    p.add_argument("--username", default="admin@example.com", help="admin e-mail (created at first start)")
    p.add_argument("--token-file", help="use the token in this file for the admin (first start only)")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--detach", action="store_true", help="leave the server running in the background and exit")
    p.add_argument("--database", default="sqlite",
                   help="sqlite (default; one person or a few), postgresql (a local PostgreSQL cluster in "
                        "DATA_DIR/postgres, started and stopped with the server; apt-get install postgresql), "
                        "or postgresql://USER:PASSWORD@HOST:PORT/NAME (the team's). PostgreSQL from about 5 "
                        "concurrent annotators or when importing while people label")

    p = sub.add_parser("generate-pairs", help="generate N candidates per prompt (or per edit request) and form pairs",
                       description="Generate N candidate images per prompt with different seeds (tiny random "
                                   "model by default; --checkpoint/--adapter in real use), and write "
                                   "candidates.jsonl and pairs.jsonl for push-ratings/push-pairs. With --edits, "
                                   "N candidate edits per request from an edit model (Edit-2509/2511; the tiny "
                                   "edit model by default); the rows carry the sources (control_images), so "
                                   "push-pairs/push-ratings make edit projects.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="text file (one prompt a line) or JSONL with prompt")
    src.add_argument("--edits", type=Path, help="JSONL of edit requests: prompt (the instruction) and 1-3 source "
                                                "images (control_images list, or control_image, control_image_1, "
                                                "control_image_2), paths relative to the file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", help="diffusers-format Qwen-Image folder (default: the tiny model)")
    p.add_argument("--adapter", help="LoRA to load on top")
    p.add_argument("--num-candidates", type=int, default=4)
    p.add_argument("--pairing", choices=["all", "best-worst"], default="all")
    p.add_argument("--reward", help="reward name (rewards/) scoring candidates for best-worst pairing (and for "
                                    "--select disagree)")
    p.add_argument("--reward-kwargs", type=json.loads, help="JSON options of --reward, e.g. '{\"model_path\": ...}'")
    p.add_argument("--select", choices=["random", "uncertain", "disagree"],
                   help="send only --budget pairs: a seeded random sample, those the preference model is least sure "
                        "of, or those where it most disagrees with --reward (all pairs go to pairs_all.jsonl)")
    p.add_argument("--budget", type=int, help="pairs to keep with --select")
    p.add_argument("--preference-model", help="trained preference model folder (python -m rewards.preference_model "
                                              "train) for --select uncertain/disagree")
    p.add_argument("--seed", type=int, default=0, help="first seed; candidates use seed, seed+1, ...")
    p.add_argument("--height", type=int, help="default: the model's size (edits: the last source's aspect ratio)")
    p.add_argument("--width", type=int, help="default: the model's size (edits: the last source's aspect ratio)")
    p.add_argument("--steps", type=int, default=4, help="num_inference_steps")
    p.add_argument("--cfg", type=float, default=4.0, help="true_cfg_scale")
    p.add_argument("--device")
    p.add_argument("--dtype", default="bfloat16", help="checkpoint dtype")

    p = sub.add_parser("push-pairs", help="create/reuse a pairwise project and import pairs (idempotent)",
                       description="Pairwise project: two images, left/right choice, optional per-image 1-5 "
                                   "rating, optional 'both bad' flag; --raters annotators per task. Tasks carry a "
                                   "stable pair_id: pushing again imports only new pairs. Rows with source "
                                   "images (control_images, 1-3) make an edit-pair project: the instruction, the "
                                   "sources and the two edits.")
    _push_args(p, "pairs")
    p.add_argument("--per-image-rating", action="store_true", help="add a 1-5 rating under each image")
    p.add_argument("--no-both-bad", action="store_true", help="omit the 'both images are bad' flag")

    p = sub.add_parser("push-ratings", help="create/reuse a 1-5 rating project for SFT candidates (idempotent)",
                       description="Rating project: one image and its prompt, a 1-5 rating, --raters per task. "
                                   "Rows with source images (control_images, 1-3) make an edit-rating project.")
    _push_args(p, "candidates")

    p = sub.add_parser("status", help="progress: tasks by number of votes, per-annotator counts, agreement")
    p.add_argument("--project-id", type=int, required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--min-votes", type=int, default=2)
    _connection(p)

    p = sub.add_parser("pull", help="export annotations to a datasets dataset (+ JSONL), majority of raters",
                       description="Pairs -> prompt, chosen, rejected, votes, agreement; ratings -> prompt, "
                                   "image, ratings (imagefolder metadata.jsonl for the SFT rater filter); edit "
                                   "projects add control_images (edit DPO / edit SFT rows). One "
                                   "vote per rater per task (the latest); ties, skips, duplicates and tasks with "
                                   "too many raters are counted in summary.json. Written atomically.")
    p.add_argument("--project-id", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images-root", type=Path, help="read images from here (default: the project's local "
                                                     "storage folder if it exists here, else via HTTP)")
    p.add_argument("--fetch", choices=["auto", "local", "http"], default="auto")
    p.add_argument("--min-votes", type=int, default=2, help="votes the winner needs (default %(default)s)")
    p.add_argument("--max-raters", type=int, help="configured raters (default: the project's maximum_annotations)")
    p.add_argument("--overwrite", action="store_true")
    _connection(p)
    for sp in sub.choices.values():
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return ap


def cmd_server(args) -> int:
    from .server import LabelStudioServer
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    srv = LabelStudioServer(args.data_dir, args.port, document_root=args.document_root, venv=args.venv,
                            username=args.username, token=token, host=args.host, database=args.database)
    db = {"sqlite": "SQLite", "postgresql": f"PostgreSQL in {srv.data_dir / 'postgres'}"}.get(args.database,
                                                                                            "the given PostgreSQL")
    print(f"starting Label Studio on {srv.url} with {db} (data {srv.data_dir}, log {srv.log_path}) ...", flush=True)
    t0 = time.monotonic()
    srv.start(wait=args.wait)
    print(f"Label Studio is up at {srv.url} after {time.monotonic() - t0:.0f} s", flush=True)
    print(f"admin: {srv.username}; password in {srv.data_dir / 'admin_password'}", flush=True)
    print(f"export LABEL_STUDIO_URL={srv.url} LABEL_STUDIO_API_KEY=$(cat {srv.data_dir / 'admin_token'})",
          flush=True)
    if args.detach:
        (srv.data_dir / "label-studio.pid").write_text(f"{srv.proc.pid}\n")
        print(f"detached: pid {srv.proc.pid} (stop with: kill $(cat {srv.data_dir / 'label-studio.pid'}))")
        if srv.postgres is not None:
            print(f"PostgreSQL stays up too (stop it with: pg_ctl stop -D {srv.postgres.pgdata}"
                  f"{', as the postgres user' if srv.postgres.owner else ''})")
        return 0

    def _stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _stop)
    try:
        while srv.proc is not None and srv.proc.poll() is None:
            time.sleep(1)
        raise AnnotationError(f"Label Studio exited with code {srv.proc.returncode if srv.proc else '?'} "
                              f"(log {srv.log_path})")
    except KeyboardInterrupt:
        print("stopping Label Studio ...", flush=True)
        srv.stop()
    return 0


def _placement(args):
    from .push import ImagePlacement
    root = args.storage_root or args.jsonl.resolve().parent
    return ImagePlacement(root, mode=args.image_mode, document_root=args.document_root, url_prefix=args.url_prefix)


def _instructions(args) -> str | None:
    if args.instructions_file is None:
        return args.instructions
    if not args.instructions_file.is_file():
        raise AnnotationError(f"--instructions-file {args.instructions_file} does not exist")
    return args.instructions_file.read_text(encoding="utf-8").strip() or None


def cmd_push(args, kind: str) -> int:
    from .push import push
    placement = _placement(args)
    summary = push(_client(args), kind, args.jsonl, placement, title=args.title, project_id=args.project_id,
                   raters=args.raters, per_image_rating=getattr(args, "per_image_rating", False),
                   both_bad=not getattr(args, "no_both_bad", False), instructions=_instructions(args))
    print(json.dumps(summary))
    return 0


def _format_status(s: dict) -> str:
    lines = [f"project {s['project_id']} ({s['project_title']}), {s['kind']}: {s['tasks']} tasks, "
             f"{s['votes']} votes, {s['max_raters']} raters configured",
             "tasks by votes: " + ", ".join(f"{k}: {v}" for k, v in s["tasks_by_votes"].items()),
             "votes per annotator: " + (", ".join(f"{k}: {v}" for k, v in s["votes_per_rater"].items()) or "none"),
             "outcomes: " + ", ".join(f"{k}: {v}" for k, v in s["outcomes"].items()),
             f"skipped: {s['skipped_annotations']}, duplicate annotations: {s['duplicate_annotations']}, "
             f"tasks over the rater limit: {s['tasks_over_limit']}"]
    per = s.get("rater_agreement") or {}
    if per:   # least agreement first: who disagrees most is the lead's first question
        lines.append("agreement with the majority, per annotator: " + ", ".join(
            f"{k}: {v['agree']}/{v['tasks']} ({v['rate']:.0%})" for k, v in per.items()))
    a = s["agreement"]
    lines.append(f"agreement: Fleiss kappa {a['fleiss_kappa']} ({a['fleiss_items']} fully rated tasks), "
                 f"Krippendorff alpha ({a['alpha_metric']}) {a['krippendorff_alpha']} ({a['alpha_items']} tasks), "
                 f"percent agreement {a['percent_agreement']}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    from .pull import status
    s = status(_client(args), args.project_id, min_votes=args.min_votes)
    print(json.dumps(s, indent=2, default=str) if args.json else _format_status(s))
    return 0


def cmd_pull(args) -> int:
    from .pull import pull
    s = pull(_client(args), args.project_id, args.out, images_root=args.images_root, fetch=args.fetch,
             min_votes=args.min_votes, max_raters=args.max_raters, overwrite=args.overwrite)
    print(_format_status(s))
    if s["rows"] == 0:
        print(f"0 pairs have {args.min_votes} votes yet: wrote an empty dataset to {Path(args.out).resolve()}"
              if s["kind"].endswith("pairs") else f"0 candidates are rated yet: wrote an empty dataset to "
              f"{Path(args.out).resolve()}")
    else:
        print(f"wrote {s['rows']} rows to {Path(args.out).resolve()}")
    return 0


def cmd_generate(args) -> int:
    from .generate import generate_pairs
    s = generate_pairs(args.prompts, args.out, edits_file=args.edits, checkpoint=args.checkpoint,
                       adapter=args.adapter, num_candidates=args.num_candidates, pairing=args.pairing, reward=args.reward,
                       seed=args.seed, height=args.height, width=args.width, steps=args.steps, cfg=args.cfg,
                       device=args.device, dtype=args.dtype, reward_kwargs=args.reward_kwargs, select=args.select,
                       budget=args.budget, preference_model=args.preference_model)
    print(json.dumps(s))
    return 0


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse errors as one ``error:`` line and exit 2 (no usage block), for the parser and its subcommands."""
    def error(message: str):
        print(f"error: {message} (see {parser.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
    parser.error = error  # type: ignore[method-assign]
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _one_line_errors(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _one_line_errors(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    handlers = {"server": cmd_server, "generate-pairs": cmd_generate, "status": cmd_status, "pull": cmd_pull,
                "push-pairs": lambda a: cmd_push(a, "pairs"), "push-ratings": lambda a: cmd_push(a, "ratings")}
    try:
        out = getattr(args, "out", None)
        existing = next((q for q in (Path(out), *Path(out).parents) if q.exists()), None) if out else None
        if existing is not None and not existing.is_dir():  # before any work: a file where a folder must go
            raise AnnotationError(f"--out {out}: {existing} is a file, not a folder")
        return handlers[args.command](args)
    except AnnotationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # last resort: still one line, still redacted
        if args.verbose:
            raise
        print(redact(f"error: unexpected {type(e).__name__}: {' '.join(str(e).split())}"[:500]), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
