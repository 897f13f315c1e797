"""One exception type for everything the CLI reports as a one-line error, plus secret redaction."""
from __future__ import annotations

import logging

_SECRETS: set[str] = set()


class AnnotationError(Exception):
    """A user-facing failure: the CLI prints ``error: <message>`` on one line and exits non-zero."""

    def __init__(self, message: str):
        super().__init__(redact(" ".join(str(message).split())))


def register_secret(secret: str | None) -> None:
    """Remember a secret (API token, password) so that :func:`redact` and log records never show it."""
    if secret and len(secret) >= 4:
        _SECRETS.add(secret)


def redact(text: str) -> str:
    for s in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(s, "***")
    return text


class RedactingFilter(logging.Filter):
    """Logging filter that masks every registered secret in the formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            msg = record.getMessage()
            clean = redact(msg)
            if clean != msg:
                record.msg, record.args = clean, None
        return True


def install_log_redaction() -> None:
    """Attach the redacting filter to the root logger's handlers and to the HTTP libraries' loggers."""
    flt = RedactingFilter()
    root = logging.getLogger()
    for h in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(flt)
    for name in ("httpx", "httpcore", "urllib3", "label_studio_sdk", "annotation"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in lg.filters):
            lg.addFilter(flt)
