"""What makes a ``checkpoint-N`` folder resumable, and by which run.

A checkpoint is complete when its manifest (``checkpoint_manifest.json``, written after every other file, just
before the staging folder is renamed) is readable and every file it lists is there with the size it had: that is
every file a resume reads (weights, optimizer, scheduler, per-rank RNG and rollout states, trainer state). A
checkpoint whose manifest is missing, or whose files are missing or truncated, is incomplete.

The manifest also records which run wrote it: the objective, the model family, the model identity and kind
(text-to-image or edit), the fine-tuning mode and the LoRA rank. A run resumes only a checkpoint of its own kind;
any other is refused in one line before the weights load (a DPO checkpoint under SFT, an edit checkpoint under a
text-to-image recipe, another LoRA rank)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qwen_image.errors import UserError

MANIFEST_NAME = "checkpoint_manifest.json"
MANIFEST_VERSION = 1


def run_identity(config: Any) -> dict[str, Any]:
    """What a checkpoint of this run records about the run (see the module docstring)."""
    from .models import family_of
    from .objectives import objective_of_config

    try:
        objective = objective_of_config(config).name
    except UserError:  # a config of no registered objective (e.g. built in a test): its class names it
        objective = type(config).__name__
    family = family_of(config)
    lora = getattr(config, "finetune", "lora") == "lora"
    return {"objective": objective, "model_family": family.name, "model": family.identity(config),
            "model_kind": "edit" if family.is_edit(config) else "t2i", "finetune": getattr(config, "finetune", None),
            "lora_rank": int(config.lora_rank) if lora else None}


def write_manifest(folder: str | Path, identity: dict[str, Any]) -> Path:
    """List every file under ``folder`` (relative path -> size) with ``identity``; written last, atomically."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST_NAME}
    manifest = {"version": MANIFEST_VERSION, **identity, "files": files}
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_NAME)
    return folder / MANIFEST_NAME


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def incompleteness(folder: str | Path) -> str | None:
    """None when ``folder`` is a complete checkpoint, else what is wrong with it (a few words)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return f"no readable {MANIFEST_NAME} (a save that did not finish, or a checkpoint of an older version)"
    for name, size in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when saved (truncated or replaced)"
    return None


_WHAT = {"objective": "objective", "model_family": "model family", "model_kind": "model kind", "model": "model",
         "finetune": "finetune", "lora_rank": "lora_rank"}


def foreign_reason(folder: str | Path, config: Any) -> str | None:
    """None when the checkpoint at ``folder`` was written by a run like ``config``'s, else the first difference
    as one sentence with what to do."""
    manifest = read_manifest(folder) or {}
    mine = run_identity(config)
    for key in ("objective", "model_family", "model_kind", "finetune", "lora_rank", "model"):
        theirs = manifest.get(key)
        if theirs is None and key not in manifest:
            continue
        if theirs != mine[key]:
            if key == "objective":
                return (f"it is a {theirs} checkpoint and this is a {mine[key]} run: a checkpoint resumes the "
                        f"objective that wrote it (start {mine[key]} from its weights with --init_adapter or "
                        f"--model_name_or_path instead)")
            if key == "lora_rank":
                return f"it was trained with lora_rank {theirs}, this run has --lora_rank {mine[key]}: resume with --lora_rank {theirs}"
            if key == "model_kind":
                kinds = {"edit": "an edit model", "t2i": "a text-to-image model"}
                return (f"it was trained on {kinds.get(theirs, theirs)}, this run's model is {kinds[mine[key]]}: "
                        f"resume with the model it was trained on")
            return f"its {_WHAT[key]} is {theirs!r}, this run's is {mine[key]!r}"
    return None
