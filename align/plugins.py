"""Objectives and model families defined outside the package register themselves when their module is imported:
``QWEN_IMAGE_ALIGN_PLUGINS`` names such modules (dotted names) or ``.py`` files, comma-separated. The registries
(``align/objectives.py``, ``align/models``) import them before every look-up, in every process a launch starts
(the variable is inherited), so ``qwen-image-align NAME`` and ``accelerate launch align/train.py NAME`` see them.
``Registry`` is what the two registries share: registering under a name and looking a name up."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from qwen_image.errors import UnknownNameError, UserError

T = TypeVar("T")

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


class Registry(Generic[T]):
    """Entries of one kind by name. ``kind`` names them in the clash error (``"objective"``), ``option`` in the
    unknown-name error (default: ``kind``); ``same(old, new)`` says when registering a taken name again is the same
    entry (a module imported twice) rather than a clash. Look-ups do not load plugins: the registries decide when."""

    def __init__(self, kind: str, same: Callable[[T, T], bool], option: str | None = None):
        self.kind = kind
        self.option = option or kind
        self._same = same
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, replace: bool = False) -> T:
        if name in self._entries and not replace and not self._same(self._entries[name], entry):
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        raise UnknownNameError(f"unknown {self.option} {name!r}; choose one of {', '.join(self.names())}")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())
