"""The demo workflow's YAML config: one file names every stage's settings; ``fast:`` overrides them for tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("slogans", "caption", "size", "model", "sft", "pairs", "dpo_grpo", "eval")


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``; nested dicts merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_path(path: str | Path) -> Path:
    """A path as given, or relative to the repository root when it does not exist from the current folder
    (so the demo runs from any folder of an editable install)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p.resolve()
    return REPO_ROOT / p


def load_workflow_config(path: str | Path, fast: bool = False) -> dict[str, Any]:
    """Read the workflow YAML; with ``fast`` apply its ``fast:`` section. One-line errors for a wrong file."""
    p = resolve_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"workflow config {str(path)!r} not found")
    cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: expected a mapping at the top level")
    fast_cfg = cfg.pop("fast", None) or {}
    if fast:
        cfg = deep_merge(cfg, fast_cfg)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"{p}: missing keys {missing}")
    if not cfg["slogans"] or any(not isinstance(s, str) or not s.strip() for s in cfg["slogans"]):
        raise ValueError(f"{p}: slogans must be a non-empty list of non-empty strings")
    if "{slogan}" not in cfg["caption"]:
        raise ValueError(f"{p}: caption must contain {{slogan}}, e.g. 'a brand sign that says \"{{slogan}}\"'")
    held = cfg.get("heldout_captions") or []
    if not isinstance(held, list) or any(not isinstance(t, str) or "{slogan}" not in t for t in held):
        raise ValueError(f"{p}: heldout_captions must be a list of templates with {{slogan}}, e.g. ['a poster: \"{{slogan}}\"']")
    if cfg["caption"] in held:
        raise ValueError(f"{p}: heldout_captions must differ from caption (they are the prompts no stage trains on)")
    if int(cfg["size"]) % 16:
        raise ValueError(f"{p}: size must be a multiple of 16 px, got {cfg['size']}")
    cfg["fast"] = bool(fast)
    return cfg
