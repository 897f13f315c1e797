"""Build Label Studio tasks from generate-pairs output and import them idempotently.

Input JSONL (written by ``generate-pairs``; paths relative to the JSONL's folder or absolute):
- pairs:      ``{"pair_id", "prompt", "image_a", "image_b", ...}``
- candidates: ``{"candidate_id", "prompt", "image", ...}``
- edits: the same plus the 1-3 source images, as ``control_images: [...]`` or ``control_image``,
  ``control_image_1``, ``control_image_2`` (align/data/edit.py's columns); ``prompt`` is the instruction. A file
  where any row has a source column is an edit file, and then every row needs 1-3 sources.
Each task keeps the stable id (``pair_id``/``candidate_id``); a re-push imports only ids not yet in the project.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .client import LabelStudioClient
from .configs import SIZE_KEYS, SOURCES_KEY, base_kind, label_config, project_kind
from .errors import AnnotationError

log = logging.getLogger("annotation")

PAIRS = {"id_key": "pair_id", "image_keys": ("image_a", "image_b"), "file_keys": ("file_a", "file_b")}
RATINGS = {"id_key": "candidate_id", "image_keys": ("image",), "file_keys": ("file",)}
SPECS = {"pairs": PAIRS, "ratings": RATINGS, "edit-pairs": {**PAIRS, "edit": True},
         "edit-ratings": {**RATINGS, "edit": True}}
IMPORT_CHUNK = 500
# The control-image columns of align/data/edit.py and qwen_image's reference limit, repeated here because
# annotation/ never imports torch (tests/test_annotation_edit.py checks they agree).
CONTROL_COLUMNS = ("control_image", "control_image_1", "control_image_2")
CONTROL_LIST_COLUMN = "control_images"
MAX_SOURCES = 3
SOURCE_FILES_KEY = "control_files"   # task data: the sources' paths relative to the storage root


def stable_id(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise AnnotationError(f"{path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise AnnotationError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


@dataclass
class ImagePlacement:
    """How task image URLs are made: Label Studio local-files storage, or plain URLs under a prefix."""

    storage_root: Path
    mode: str = "local-files"            # or "url"
    document_root: Path | None = None    # must equal the server's LOCAL_FILES_DOCUMENT_ROOT (local-files)
    url_prefix: str | None = None        # e.g. https://cdn.example.com/run7/ (url)
    sizes: dict = field(default_factory=dict, repr=False)   # path under the storage root -> "W×H px"

    def __post_init__(self):
        self.storage_root = Path(self.storage_root).expanduser().resolve()
        if self.mode == "local-files":
            if self.document_root is None:
                raise AnnotationError("local-files images need --document-root (the server's "
                                      "LOCAL_FILES_DOCUMENT_ROOT)")
            self.document_root = Path(self.document_root).expanduser().resolve()
            if not inside(self.storage_root, self.document_root):
                raise AnnotationError(f"storage root {self.storage_root} is not under the document root "
                                      f"{self.document_root}")
        elif self.mode == "url":
            if not self.url_prefix:
                raise AnnotationError("url images need --url-prefix")
        else:
            raise AnnotationError(f"unknown image mode {self.mode!r} (local-files or url)")

    def place(self, base: Path, value: str, what: str) -> tuple[str, str]:
        """(task URL, path relative to the storage root) for an image path from the JSONL."""
        p = Path(value)
        full = (p if p.is_absolute() else base / p).resolve()
        if not inside(full, self.storage_root):
            raise AnnotationError(f"{what}: image path {value!r} escapes the storage root {self.storage_root}")
        if not full.is_file():
            raise AnnotationError(f"{what}: image {full} does not exist")
        rel = full.relative_to(self.storage_root).as_posix()
        self.sizes[rel] = image_size(full)
        if self.mode == "local-files":
            return "/data/local-files/?d=" + quote(full.relative_to(self.document_root).as_posix()), rel
        return self.url_prefix.rstrip("/") + "/" + quote(rel), rel


def image_size(path: Path) -> str:
    """``"512×512 px"``: Label Studio scales images to the space it has, so the page shows the real size."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return f"{im.width}\u00d7{im.height} px"
    except OSError as e:
        raise AnnotationError(f"image {path} is not readable as an image ({e})") from None


def has_sources(rec: dict) -> bool:
    """A row that names a source column (even empty: then it is an edit row missing its source, an error)."""
    return any(c in rec for c in (*CONTROL_COLUMNS, CONTROL_LIST_COLUMN))


def source_paths(rec: dict, what: str) -> list[str]:
    """A row's 1-3 source (control) image paths, in order, from the list column or the numbered ones."""
    numbered = [c for c in CONTROL_COLUMNS if c in rec]
    if numbered and CONTROL_LIST_COLUMN in rec:
        raise AnnotationError(f"{what}: both {numbered[0]} and {CONTROL_LIST_COLUMN}; list the sources one way")
    if CONTROL_LIST_COLUMN in rec:
        values = rec[CONTROL_LIST_COLUMN]
        values = values if isinstance(values, list) else [values]
    else:
        values = [rec.get(c) for c in CONTROL_COLUMNS]
        while values and values[-1] in (None, ""):
            values.pop()
    if not values:
        raise AnnotationError(f"{what}: no source image (give {CONTROL_LIST_COLUMN} or {CONTROL_COLUMNS[0]})")
    if len(values) > MAX_SOURCES:
        raise AnnotationError(f"{what}: {len(values)} source images; Edit-2509/2511 take 1 to {MAX_SOURCES}")
    for k, v in enumerate(values, 1):
        if not isinstance(v, str) or not v:
            raise AnnotationError(f"{what}: source image {k} of {len(values)} is empty")
    return values


def build_tasks(records: list[dict], base: Path, placement: ImagePlacement, spec: dict) -> list[dict]:
    """Validate every record first (nothing is imported if one is bad), then build task dicts."""
    tasks, seen = [], set()
    edit = spec.get("edit", False)
    for n, rec in enumerate(records, 1):
        missing = [k for k in ("prompt", *spec["image_keys"]) if k not in rec]
        if missing:
            raise AnnotationError(f"record {n}: missing {', '.join(missing)}")
        sources = source_paths(rec, f"record {n}") if edit else []
        rid = str(rec.get(spec["id_key"]) or stable_id(rec["prompt"], *sources,
                                                        *(str(rec[k]) for k in spec["image_keys"])))
        if rid in seen:
            continue
        seen.add(rid)
        data = {k: v for k, v in rec.items() if (isinstance(v, (str, int, float, bool)) or v is None)
                and k not in CONTROL_COLUMNS}
        data[spec["id_key"]] = rid
        what = f"{spec['id_key']} {rid}"
        for key, file_key in zip(spec["image_keys"], spec["file_keys"]):
            data[key], data[file_key] = placement.place(base, str(rec[key]), what)
            data[SIZE_KEYS[key]] = placement.sizes[data[file_key]]
        if edit:
            placed = [placement.place(base, p, f"{what}, source {k}") for k, p in enumerate(sources, 1)]
            data[SOURCES_KEY], data[SOURCE_FILES_KEY] = [u for u, _ in placed], [r for _, r in placed]
        tasks.append({"data": data})
    return tasks


def detect_kind(kind: str, records: list[dict]) -> str:
    """``pairs``/``ratings``, or their edit twin when any row names a source image."""
    return f"edit-{kind}" if any(has_sources(r) for r in records) else kind


def ensure_project(client: LabelStudioClient, kind: str, title: str | None, project_id: int | None,
                   raters: int, per_image_rating: bool = False, both_bad: bool = True,
                   instructions: str | None = None) -> tuple[int, bool]:
    """(project id, created?) — reuse ``project_id`` or the oldest project titled ``title``, else create.

    ``instructions``: what a new rater reads once before the first task (what "better" means for this project);
    given again on a reused project, they replace the old ones."""
    if project_id is None and title:
        project_id = client.find_project(title)
    if project_id is not None:
        p = client.get_project(project_id)
        try:
            have = project_kind(p["label_config"] or "")
        except AnnotationError:
            have = "other"
        if have != kind:
            raise AnnotationError(f"project {project_id} ({p['title']!r}) is a {have} project, not {kind}")
        if instructions:
            client.set_instructions(project_id, instructions)
        return project_id, False
    if not title:
        raise AnnotationError("give --title (to create or reuse a project) or --project-id")
    config = label_config(kind, per_image_rating=per_image_rating, both_bad=both_bad)
    desc = f"qwen-image-align {kind}; {raters} raters per task"
    return client.create_project(title, config, maximum_annotations=raters, description=desc,
                                 instructions=instructions), True


# What the task list shows: the prompt, the images, and the progress columns; the rest hides it off-screen.
_SHOWN = {"prompt", "image_a", "image_b", "image", SOURCES_KEY}
_HIDDEN_FIELDS = ("inner_id", "cancelled_annotations", "total_predictions", "annotations_results", "annotations_ids",
                  "predictions_score", "predictions_model_versions", "predictions_results", "file_upload",
                  "storage_filename", "created_at", "updated_at", "updated_by", "avg_lead_time", "draft_exists")


def hidden_columns(kind: str, tasks: list[dict]) -> list[str]:
    keys = sorted({k for t in tasks for k in t["data"]} - _SHOWN)
    return [f"tasks:data.{k}" for k in keys] + [f"tasks:{f}" for f in _HIDDEN_FIELDS]


def existing_ids(client: LabelStudioClient, project_id: int, id_key: str) -> set[str]:
    return {str(t["data"][id_key]) for t in client.export(project_id) if id_key in (t.get("data") or {})}


def push(client: LabelStudioClient, kind: str, jsonl: Path, placement: ImagePlacement, *, title: str | None = None,
         project_id: int | None = None, raters: int = 3, per_image_rating: bool = False,
         both_bad: bool = True, instructions: str | None = None) -> dict:
    """Create or reuse the project, register the storage, import the tasks not there yet. Returns a summary.

    ``kind``: ``pairs`` or ``ratings``; rows with source images make it ``edit-pairs`` / ``edit-ratings``."""
    jsonl = Path(jsonl).resolve()
    records = read_jsonl(jsonl)
    kind = detect_kind(base_kind(kind), records)
    spec = SPECS[kind]
    tasks = build_tasks(records, jsonl.parent, placement, spec)   # validates before any write
    client.whoami()
    pid, created = ensure_project(client, kind, title, project_id, raters, per_image_rating, both_bad, instructions)
    if placement.mode == "local-files":
        client.ensure_local_storage(pid, placement.storage_root)
    if created:
        client.create_task_view(pid, "Tasks", hidden_columns(kind, tasks))
    have = set() if created else existing_ids(client, pid, spec["id_key"])
    new = [t for t in tasks if t["data"][spec["id_key"]] not in have]
    imported = 0
    for i in range(0, len(new), IMPORT_CHUNK):
        imported += client.import_tasks(pid, new[i:i + IMPORT_CHUNK])
    summary = {"project_id": pid, "kind": kind, "created": created, "tasks_in_file": len(tasks), "already_present":
               len(tasks) - len(new), "imported": imported, "url": f"{client.url}/projects/{pid}/data"}
    log.info("push %s: %s", kind, summary)
    return summary
