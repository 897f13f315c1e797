"""The one exception type for mistakes a user can fix (a bad option, a missing file, unusable data, a bad size).

It lives in the model bundle, the lowest layer, so that ``qwen_image/``, ``rewards/``, ``annotation/`` and
``align/`` all raise the same type without importing upwards. Launch scripts and CLIs print ``error: <message>``
on one line and exit 2 for it; every other exception is a bug and keeps its traceback. It subclasses ValueError so
callers that catch ValueError still work.
"""

from __future__ import annotations


class UserError(ValueError):
    """A message meant for the user: what is wrong (file, row, field) and what to do. Always one line."""

    def __init__(self, message: str):
        # One line on the terminal: multi-line details (a data summary) are joined with "; ".
        super().__init__("; ".join(part.strip() for part in str(message).splitlines() if part.strip()))


class UnknownNameError(UserError, KeyError):
    """An unknown name (a reward, a filter): a UserError that callers catching KeyError also see."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class QwenImageInputError(UserError):
    """A bad argument given to the model bundle (size, prompt, path, dtype). The message says how to fix it."""


def stop_everywhere(message: str) -> UserError:
    """A UserError that every process of a multi-process run raises at the same point, after they agreed on it
    (an exchange between the processes): only the first process prints its line (``align.launch``), so a
    2-process run says it once."""
    err = UserError(message)
    err.same_on_every_process = True  # type: ignore[attr-defined]
    return err


def on_processes(rank: int, count: int, world: int, inside: bool = False) -> str:
    """Which process a problem came from (`` (on process 1 of 2, not the others)``), when not every process of a
    multi-process run had it; empty otherwise. ``inside``: as a clause (``; on process ...``) for a parenthesis."""
    if world == 1 or count == world:
        return ""
    text = f"on process {rank} of {world}" + (f" and {count - 1} more" if count > 1 else "") + ", not the others"
    return f"; {text}" if inside else f" ({text})"
