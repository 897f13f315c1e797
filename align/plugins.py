"""Objectives and model families defined outside the package register themselves when their module is imported:
``QWEN_IMAGE_ALIGN_PLUGINS`` names such modules (dotted names) or ``.py`` files, comma-separated. The registries
(``align/objectives.py``, ``align/models``) import them before every look-up, in every process a launch starts
(the variable is inherited), so ``qwen-image-align NAME`` and ``accelerate launch align/train.py NAME`` see them."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from qwen_image.errors import UserError

PLUGINS_ENV = "QWEN_IMAGE_ALIGN_PLUGINS"


def load_plugins() -> None:
    """Import every module / file named in ``QWEN_IMAGE_ALIGN_PLUGINS`` once."""
    for entry in filter(None, (e.strip() for e in os.environ.get(PLUGINS_ENV, "").split(","))):
        if entry.endswith(".py"):
            path = Path(entry).resolve()
            if not path.is_file():
                raise UserError(f"{PLUGINS_ENV}: no such file {entry}")
            name = f"_qwen_image_align_plugin_{path.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            try:
                importlib.import_module(entry)
            except ModuleNotFoundError as err:
                raise UserError(f"{PLUGINS_ENV}: cannot import {entry!r} ({err})") from None
