"""Reward registry: every reward has the signature

    reward(prompts: list[str], images: list[PIL.Image.Image], **columns) -> list[float | None]

``columns`` are per-sample dataset columns (lists aligned with ``prompts``, e.g. ``text=[...]``); a reward
ignores the columns it does not read. ``None`` means "not applicable" (e.g. no text to render) and is
excluded from means.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Protocol

from PIL import Image

from qwen_image.errors import UnknownNameError

__all__ = ["RewardFn", "register_reward", "get_reward", "available_rewards", "reward_name"]


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], images: list[Image.Image], **columns: Any) -> list[float | None]: ...


_REGISTRY: dict[str, tuple[Callable, bool]] = {}


def register_reward(name: str, *, factory: bool | None = None, overwrite: bool = False):
    """Decorator registering a reward under ``name``.

    Decorate either a reward function (``fn(prompts, images, **columns)``) or a *factory* that builds one
    from keyword options (a class whose instances are rewards, or a function with ``factory=True``).
    ``get_reward(name, **kwargs)`` calls a factory with ``kwargs``; for a plain function it returns the
    function itself, or a ``functools.partial`` binding ``kwargs`` as keyword options.
    """
    if not name or not isinstance(name, str):
        raise ValueError("reward name must be a non-empty string")

    def deco(obj):
        if name in _REGISTRY and not overwrite and _REGISTRY[name][0] is not obj:
            raise ValueError(f"reward {name!r} is already registered (pass overwrite=True to replace it)")
        is_factory = inspect.isclass(obj) if factory is None else factory
        _REGISTRY[name] = (obj, is_factory)
        try:
            if not is_factory:
                obj.reward_name = name
            elif inspect.isclass(obj):
                obj.reward_name = name
        except (AttributeError, TypeError):  # pragma: no cover - builtins
            pass
        return obj

    return deco


def _lookup(name: str) -> tuple[Callable, bool]:
    """``(reward or factory, is_factory)`` for a registry name or a dotted path ``my_pkg.my_module.my_reward``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "." not in name:
        raise UnknownNameError(f"unknown reward {name!r}; available: {', '.join(available_rewards())} "
                       "(or a dotted path like my_pkg.my_reward)")
    # A dotted path, as TRL's GRPO script takes: a reward outside this package needs no edit of rewards/.
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownNameError(f"reward {name!r}: cannot import {module_name!r} ({err})") from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise UnknownNameError(f"reward {name!r}: {module_name!r} has no callable {attr!r}")
    if getattr(obj, "reward_name", None) in _REGISTRY:  # the module registered it itself: honour its factory flag
        return _REGISTRY[obj.reward_name]
    return obj, inspect.isclass(obj)


def get_reward(name: str, **kwargs: Any) -> RewardFn:
    """Build the reward registered as ``name`` (see :func:`available_rewards`), or the callable at the dotted path
    ``name`` (``my_pkg.my_reward``: a function, or a class whose instances are rewards), with keyword options."""
    obj, is_factory = _lookup(name)
    if is_factory:
        fn = obj(**kwargs)
        if getattr(fn, "reward_name", None) is None:
            try:
                fn.reward_name = name
            except AttributeError:  # pragma: no cover
                pass
        return fn
    if not kwargs:
        return obj
    fn = functools.partial(obj, **kwargs)
    fn.reward_name = name  # type: ignore[attr-defined]
    return fn


def available_rewards() -> list[str]:
    """Sorted names of the registered rewards."""
    return sorted(_REGISTRY)


def reward_name(fn: Any) -> str:
    """The display name of a reward callable (its registry name, else its ``__name__`` / class name)."""
    name = getattr(fn, "reward_name", None)
    if isinstance(name, str):
        return name
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    return getattr(fn, "__name__", type(fn).__name__)
