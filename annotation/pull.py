"""Export a project into a ``datasets`` dataset on disk (and JSONL), atomically.

Layout of ``--out DIR`` (written to a temp dir next to it, renamed at the end; nothing half-written):
- pairs:   ``images/``, ``metadata.jsonl`` (``prompt, chosen, rejected`` as image paths relative to it, ``votes,
  n_votes, agreement, pair_id, ...``: what align/data/preference.py reads from the folder), ``hf/``
  (``datasets.load_from_disk``: ``chosen``/``rejected`` Image columns)
- ratings: ``images/``, ``metadata.jsonl`` (imagefolder: ``file_name, prompt, ratings``), ``hf/`` (``image``)
- edit-pairs / edit-ratings: the same plus ``control_images`` (the 1-3 sources, in order; paths in
  ``metadata.jsonl``, a list of images in ``hf/``): what align/data/edit.py reads (edit DPO / edit SFT)
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
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from .aggregate import aggregate_pairs, aggregate_ratings
from .client import LabelStudioClient
from .configs import SOURCES_KEY, base_kind, project_kind
from .errors import AnnotationError
from .push import CONTROL_LIST_COLUMN, MAX_SOURCES, SOURCE_FILES_KEY, inside, stable_id

log = logging.getLogger("annotation")


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:80] or "x"


class ImageSource:
    """Reads task images from the local storage root (``fetch='local'``) or through the server (``'http'``)."""

    def __init__(self, client: LabelStudioClient, root: Path | None, fetch: str):
        self.client, self.fetch = client, fetch
        self.root = Path(root).resolve() if root else None
        if fetch == "local" and self.root is None:
            raise AnnotationError("--fetch local needs --images-root (or a project local-files storage)")

    def check(self, task_id, ref: "ImageRef") -> None:
        """Refuse a task whose image path escapes the storage root, before anything is written."""
        rel, url, url_key, file_key = ref.rel, ref.url or "", ref.url_key, ref.file_key
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

    def read(self, ref: "ImageRef") -> bytes:
        if self.fetch == "local":
            path = (self.root / ref.rel).resolve()
            if not path.is_file():
                raise AnnotationError(f"image {path} is missing")
            return path.read_bytes()
        return self.client.fetch(ref.url)


@dataclass
class ImageRef:
    """One image of a task: its URL (``data[url_key]``) and its path under the storage root (``data[file_key]``)."""

    url_key: str
    file_key: str
    url: str | None
    rel: str | None

    @classmethod
    def of(cls, data: dict, url_key: str, file_key: str) -> "ImageRef":
        return cls(url_key, file_key, data.get(url_key), data.get(file_key))

    @property
    def ext(self) -> str:
        name = self.rel or urlparse(self.url or "").path
        ext = Path(str(name)).suffix.lower()
        return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".png"


def source_refs(task_id, data: dict) -> list[ImageRef]:
    """An edit task's 1-3 source images (checked: a task imported by hand may lack them)."""
    urls = data.get(SOURCES_KEY)
    files = data.get(SOURCE_FILES_KEY)
    if not isinstance(urls, list) or not urls:
        raise AnnotationError(f"task {task_id}: no source images ({SOURCES_KEY!r}) in an edit project")
    if len(urls) > MAX_SOURCES:
        raise AnnotationError(f"task {task_id}: {len(urls)} source images; Edit-2509/2511 take 1 to {MAX_SOURCES}")
    if files is not None and (not isinstance(files, list) or len(files) != len(urls)):
        raise AnnotationError(f"task {task_id}: {SOURCE_FILES_KEY!r} does not match {SOURCES_KEY!r}")
    return [ImageRef(f"{SOURCES_KEY}[{k}]", f"{SOURCE_FILES_KEY}[{k}]", u, files[k] if files else None)
            for k, u in enumerate(urls)]


def task_refs(kind: str, task_id, data: dict) -> list[ImageRef]:
    """Every image a task of ``kind`` shows."""
    keys = [("image_a", "file_a"), ("image_b", "file_b")] if base_kind(kind) == "pairs" else [("image", "file")]
    refs = [ImageRef.of(data, u, f) for u, f in keys]
    return refs + (source_refs(task_id, data) if kind.startswith("edit-") else [])


class SourceWriter:
    """Writes each distinct source image once per pull (many candidate pairs share one source)."""

    def __init__(self, tmp: Path, src: ImageSource):
        self.tmp, self.src, self.names = tmp, src, {}

    def names_for(self, task_id, data: dict) -> list[tuple[str, bytes]]:
        out = []
        for ref in source_refs(task_id, data):
            key = ref.rel or ref.url
            if key not in self.names:
                name = f"images/source_{stable_id(str(key))}{ref.ext}"
                blob = self.src.read(ref)
                (self.tmp / name).write_bytes(blob)
                self.names[key] = (name, blob)
            out.append(self.names[key])
        return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _add_sources(record: dict, hf_row: dict, sources: SourceWriter | None, task_id, data: dict) -> None:
    """Edit rows: ``control_images`` as paths (metadata.jsonl) and as images (hf/)."""
    if sources is None:
        return
    named = sources.names_for(task_id, data)
    record[CONTROL_LIST_COLUMN] = [name for name, _ in named]
    hf_row[CONTROL_LIST_COLUMN] = [{"bytes": blob, "path": name} for name, blob in named]


def _source_feature(datasets, edit: bool) -> dict:
    return {CONTROL_LIST_COLUMN: datasets.List(datasets.Image())} if edit else {}


def _write_dataset(datasets, rows: list[dict], features, path: Path) -> None:
    """``from_list([])`` cannot match the features (no keys), and 0 rows need one explicit shard: a project with no
    decided pair yet still gives a loadable, empty dataset with the right columns."""
    if rows:
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(path))
    else:
        datasets.Dataset.from_dict({k: [] for k in features}, features=features).save_to_disk(str(path), num_shards=1)


def _save_pairs(tmp: Path, rows: list[dict], tasks_by_id: dict, src: ImageSource,
                sources: SourceWriter | None = None) -> None:
    import datasets

    records, hf = [], []
    for r in rows:
        data = tasks_by_id[r["task_id"]]
        paths = {}
        for side in ("chosen", "rejected"):
            ab = r[f"{side}_side"]
            ref = ImageRef.of(data, f"image_{ab}", f"file_{ab}")
            name = f"images/{_safe_name(r['pair_id'])}_{ab}{ref.ext}"
            blob = src.read(ref)
            (tmp / name).write_bytes(blob)
            paths[side] = (name, blob)
        meta = {k: v for k, v in r.items() if k not in ("task_id",)}
        record = {"prompt": r["prompt"], "chosen": paths["chosen"][0], "rejected": paths["rejected"][0],
                  **{k: v for k, v in meta.items() if k != "prompt"}, "task_id": r["task_id"]}
        row = {"prompt": r["prompt"],
               "chosen": {"bytes": paths["chosen"][1], "path": paths["chosen"][0]},
               "rejected": {"bytes": paths["rejected"][1], "path": paths["rejected"][0]},
               "votes": r["votes"], "n_votes": r["n_votes"], "agreement": float(r["agreement"]),
               "pair_id": r["pair_id"]}
        _add_sources(record, row, sources, r["task_id"], data)
        records.append(record)
        hf.append(row)
    _write_jsonl(tmp / "metadata.jsonl", records)
    features = datasets.Features({
        "prompt": datasets.Value("string"), "chosen": datasets.Image(), "rejected": datasets.Image(),
        "votes": datasets.Value("int32"), "n_votes": datasets.Value("int32"),
        "agreement": datasets.Value("float32"), "pair_id": datasets.Value("string"),
        **_source_feature(datasets, sources is not None)})
    _write_dataset(datasets, hf, features, tmp / "hf")


def _save_ratings(tmp: Path, rows: list[dict], tasks_by_id: dict, src: ImageSource,
                  sources: SourceWriter | None = None) -> None:
    import datasets

    records, hf = [], []
    for r in rows:
        data = tasks_by_id[r["task_id"]]
        ref = ImageRef.of(data, "image", "file")
        name = f"images/{_safe_name(r['candidate_id'])}{ref.ext}"
        blob = src.read(ref)
        (tmp / name).write_bytes(blob)
        record = {"file_name": name, "prompt": r["prompt"], "ratings": r["ratings"],
                  "candidate_id": r["candidate_id"], "mean_rating": r["mean_rating"], "task_id": r["task_id"]}
        row = {"prompt": r["prompt"], "image": {"bytes": blob, "path": name}, "ratings": r["ratings"],
               "candidate_id": r["candidate_id"]}
        _add_sources(record, row, sources, r["task_id"], data)
        records.append(record)
        hf.append(row)
    _write_jsonl(tmp / "metadata.jsonl", records)
    features = datasets.Features({
        "prompt": datasets.Value("string"), "image": datasets.Image(),
        "ratings": datasets.Sequence(datasets.Value("float32")), "candidate_id": datasets.Value("string"),
        **_source_feature(datasets, sources is not None)})
    _write_dataset(datasets, hf, features, tmp / "hf")


def _aggregate(kind: str, tasks: list[dict], raters: int, min_votes: int) -> tuple[list[dict], dict]:
    """Edit projects vote like their text-to-image twins; the report names the project's own kind."""
    if base_kind(kind) == "pairs":
        rows, report = aggregate_pairs(tasks, max_raters=raters, min_votes=min_votes)
    else:
        rows, report = aggregate_ratings(tasks, max_raters=raters)
    report["kind"] = kind
    return rows, report


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

    rows, report = _aggregate(kind, tasks, raters, min_votes)
    tasks_by_id = {t["id"]: t.get("data") or {} for t in tasks}
    for task_id, data in tasks_by_id.items():   # every task's paths are checked before anything is written
        for ref in task_refs(kind, task_id, data):
            src.check(task_id, ref)

    summary = {"project_id": project_id, "project_title": project["title"], "rows": len(rows),
               "image_source": fetch, **name_raters(client, report)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        sources = SourceWriter(tmp, src) if kind.startswith("edit-") else None
        save = _save_pairs if base_kind(kind) == "pairs" else _save_ratings
        save(tmp, rows, tasks_by_id, src, sources)
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
    _, report = _aggregate(kind, client.export(project_id), raters, min_votes)
    return {"project_id": project_id, "project_title": project["title"], **name_raters(client, report)}


def name_raters(client: LabelStudioClient, report: dict) -> dict:
    """Raters by e-mail (the export names them by user id), the same in ``status`` and in ``pull``'s summary."""
    try:
        names = client.users()
    except AnnotationError:   # an account that may not list users still gets its counts, by id
        names = {}
    for key in ("votes_per_rater", "rater_agreement"):
        report[key] = {names.get(k, str(k)): v for k, v in report.get(key, {}).items()}
    return report
