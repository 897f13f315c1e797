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
