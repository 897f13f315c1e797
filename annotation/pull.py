"""Export a project into a ``datasets`` dataset on disk (and JSONL), atomically.

Layout of ``--out DIR`` (written to a temp dir next to it, renamed at the end; nothing half-written):
- pairs:   ``images/``, ``metadata.jsonl`` (``prompt, chosen, rejected`` as image paths relative to it, ``votes,
  n_votes, agreement, pair_id, ...``: what align/data/preference.py reads from the folder), ``hf/``
  (``datasets.load_from_disk``: ``chosen``/``rejected`` Image columns)
- ratings: ``images/``, ``metadata.jsonl`` (imagefolder: ``file_name, prompt, ratings``), ``hf/`` (``image``)
- ``summary.json``: counts (ties, skipped, duplicates, tasks over the rater limit...) and agreement.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from .aggregate import aggregate_pairs, aggregate_ratings
from .client import LabelStudioClient
from .errors import AnnotationError
from .push import inside

log = logging.getLogger("annotation")


def project_kind(label_config: str) -> str:
    if "<Pairwise" in label_config:
        return "pairs"
    if "<Rating" in label_config:
        return "ratings"
    raise AnnotationError("project is neither a pairwise nor a rating project (no <Pairwise>/<Rating> tag)")


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:80] or "x"


class ImageSource:
    """Reads task images from the local storage root (``fetch='local'``) or through the server (``'http'``)."""

    def __init__(self, client: LabelStudioClient, root: Path | None, fetch: str):
        self.client, self.fetch = client, fetch
        self.root = Path(root).resolve() if root else None
        if fetch == "local" and self.root is None:
            raise AnnotationError("--fetch local needs --images-root (or a project local-files storage)")

    def check(self, task_id, data: dict, url_key: str, file_key: str) -> None:
        """Refuse a task whose image path escapes the storage root, before anything is written."""
        rel = data.get(file_key)
        url = data.get(url_key) or ""
        if self.fetch == "local":
            if rel is None:
                raise AnnotationError(f"task {task_id}: no {file_key!r} in task data; use --fetch http")
            if not inside((self.root / rel).resolve(), self.root):
                raise AnnotationError(f"task {task_id}: image path {rel!r} escapes the storage root {self.root}")
        else:
            d = parse_qs(urlparse(url).query).get("d", [None])[0] if "/data/local-files" in url else None
            for p in (d, rel):
                if p is not None and (posixpath.isabs(p) or posixpath.normpath(p).startswith("..")):
                    raise AnnotationError(f"task {task_id}: image path {p!r} escapes the storage root")
            if not url:
                raise AnnotationError(f"task {task_id}: no image URL in {url_key!r}")

    def read(self, data: dict, url_key: str, file_key: str) -> bytes:
        if self.fetch == "local":
            path = (self.root / data[file_key]).resolve()
            if not path.is_file():
                raise AnnotationError(f"image {path} is missing")
            return path.read_bytes()
        return self.client.fetch(data[url_key])


def _ext(data: dict, file_key: str, url_key: str) -> str:
    name = data.get(file_key) or urlparse(data.get(url_key) or "").path
    ext = Path(str(name)).suffix.lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".png"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _save_pairs(tmp: Path, rows: list[dict], tasks_by_id: dict, src: ImageSource) -> None:
    import datasets

    records, hf = [], []
    for r in rows:
        data = tasks_by_id[r["task_id"]]
        paths = {}
        for side in ("chosen", "rejected"):
            ab = r[f"{side}_side"]
            url_key, file_key = f"image_{ab}", f"file_{ab}"
            name = f"images/{_safe_name(r['pair_id'])}_{ab}{_ext(data, file_key, url_key)}"
            blob = src.read(data, url_key, file_key)
            (tmp / name).write_bytes(blob)
            paths[side] = (name, blob)
        meta = {k: v for k, v in r.items() if k not in ("task_id",)}
        records.append({"prompt": r["prompt"], "chosen": paths["chosen"][0], "rejected": paths["rejected"][0],
                        **{k: v for k, v in meta.items() if k != "prompt"}, "task_id": r["task_id"]})
        hf.append({"prompt": r["prompt"],
                   "chosen": {"bytes": paths["chosen"][1], "path": paths["chosen"][0]},
                   "rejected": {"bytes": paths["rejected"][1], "path": paths["rejected"][0]},
                   "votes": r["votes"], "n_votes": r["n_votes"], "agreement": float(r["agreement"]),
                   "pair_id": r["pair_id"]})
    _write_jsonl(tmp / "metadata.jsonl", records)
    features = datasets.Features({
        "prompt": datasets.Value("string"), "chosen": datasets.Image(), "rejected": datasets.Image(),
        "votes": datasets.Value("int32"), "n_votes": datasets.Value("int32"),
        "agreement": datasets.Value("float32"), "pair_id": datasets.Value("string")})
    datasets.Dataset.from_list(hf, features=features).save_to_disk(str(tmp / "hf"))


def _save_ratings(tmp: Path, rows: list[dict], tasks_by_id: dict, src: ImageSource) -> None:
    import datasets

    records, hf = [], []
    for r in rows:
        data = tasks_by_id[r["task_id"]]
        name = f"images/{_safe_name(r['candidate_id'])}{_ext(data, 'file', 'image')}"
        blob = src.read(data, "image", "file")
        (tmp / name).write_bytes(blob)
        records.append({"file_name": name, "prompt": r["prompt"], "ratings": r["ratings"],
                        "candidate_id": r["candidate_id"], "mean_rating": r["mean_rating"],
                        "task_id": r["task_id"]})
        hf.append({"prompt": r["prompt"], "image": {"bytes": blob, "path": name}, "ratings": r["ratings"],
                   "candidate_id": r["candidate_id"]})
    _write_jsonl(tmp / "metadata.jsonl", records)
    features = datasets.Features({
        "prompt": datasets.Value("string"), "image": datasets.Image(),
        "ratings": datasets.Sequence(datasets.Value("float32")), "candidate_id": datasets.Value("string")})
    datasets.Dataset.from_list(hf, features=features).save_to_disk(str(tmp / "hf"))


def pull(client: LabelStudioClient, project_id: int, out: Path, *, images_root: Path | None = None,
         fetch: str = "auto", min_votes: int = 2, max_raters: int | None = None, overwrite: bool = False) -> dict:
    """Export, aggregate, and write ``out`` atomically. Returns the summary (also written to summary.json)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise AnnotationError(f"{out} already exists (use --overwrite)")
    project = client.get_project(project_id)
    kind = project_kind(project["label_config"] or "")
    raters = max_raters or project["maximum_annotations"] or 3
    tasks = client.export(project_id)
    if fetch == "auto" or (fetch == "local" and images_root is None):
        if images_root is None:
            roots = [Path(s["path"]) for s in client.local_storages(project_id)]
            images_root = next((r for r in roots if r.is_dir()), None)
        if fetch == "auto":
            fetch = "local" if images_root is not None and Path(images_root).is_dir() else "http"
    src = ImageSource(client, images_root, fetch)

    if kind == "pairs":
        rows, report = aggregate_pairs(tasks, max_raters=raters, min_votes=min_votes)
        keys = [("image_a", "file_a"), ("image_b", "file_b")]
    else:
        rows, report = aggregate_ratings(tasks, max_raters=raters)
        keys = [("image", "file")]
    tasks_by_id = {t["id"]: t.get("data") or {} for t in tasks}
    for task_id, data in tasks_by_id.items():   # every task's paths are checked before anything is written
        for url_key, file_key in keys:
            src.check(task_id, data, url_key, file_key)

    summary = {"project_id": project_id, "project_title": project["title"], "rows": len(rows),
               "image_source": fetch, **report}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (_save_pairs if kind == "pairs" else _save_ratings)(tmp, rows, tasks_by_id, src)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("pull: %d %s rows -> %s", len(rows), kind, out)
    return summary


def status(client: LabelStudioClient, project_id: int, min_votes: int = 2) -> dict:
    """Progress of a project: tasks by number of votes, per-annotator counts, agreement so far."""
    project = client.get_project(project_id)
    kind = project_kind(project["label_config"] or "")
    raters = project["maximum_annotations"] or 3
    tasks = client.export(project_id)
    if kind == "pairs":
        _, report = aggregate_pairs(tasks, max_raters=raters, min_votes=min_votes)
    else:
        _, report = aggregate_ratings(tasks, max_raters=raters)
    try:
        names = client.users()
    except AnnotationError:
        names = {}
    report["votes_per_rater"] = {names.get(k, str(k)): v for k, v in report["votes_per_rater"].items()}
    return {"project_id": project_id, "project_title": project["title"], **report}
