"""Thin wrapper over label-studio-sdk 2.1.2 with our own retry policy, one-line errors and no token leaks.

The SDK retries every request (POSTs included) on 5xx/409/429 and connection errors, which can duplicate an
annotation or an import. We switch that off (``max_retries=0`` per call) and retry ourselves: reads and other
idempotent calls on transient failures, writes only when the request never reached the server (connect errors).
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

from .errors import AnnotationError, register_secret

log = logging.getLogger("annotation")

DEFAULT_URL = "http://127.0.0.1:8080"
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_NO_SDK_RETRY = {"max_retries": 0}


def resolve_token(token_file: str | None = None) -> str:
    """The API token from ``--token-file``, else ``LABEL_STUDIO_API_KEY`` (never from a plain CLI flag)."""
    if token_file:
        p = Path(token_file).expanduser()
        if not p.exists():
            raise AnnotationError(f"token file {p} does not exist")
        token = p.read_text().strip()
    else:
        token = os.environ.get("LABEL_STUDIO_API_KEY", "").strip()
    if not token:
        raise AnnotationError("no API token: set LABEL_STUDIO_API_KEY or pass --token-file")
    register_secret(token)
    return token


def check_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host (and a valid port); else a one-line AnnotationError."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(str(url))
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as err:
        raise AnnotationError(f"--url {url!r} is not a valid URL ({err})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AnnotationError(f"--url {url!r} is not an http(s) URL with a host, like http://127.0.0.1:8080")
    return url


def _is_connect_error(exc: BaseException) -> bool:
    import httpx
    import requests
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, requests.ConnectionError)) and not isinstance(
        exc, requests.exceptions.ChunkedEncodingError)


def _is_transient(exc: BaseException) -> bool:
    import httpx
    import requests
    from label_studio_sdk.core.api_error import ApiError
    if isinstance(exc, ApiError):
        return exc.status_code in TRANSIENT_STATUS
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code in TRANSIENT_STATUS
    return isinstance(exc, (httpx.TransportError, requests.ConnectionError, requests.Timeout,
                            requests.exceptions.ChunkedEncodingError))


class LabelStudioClient:
    """Everything annotation/ needs from a Label Studio server."""

    def __init__(self, url: str, token: str, retries: int = 4, backoff: float = 0.5, timeout: float = 60.0):
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        register_secret(token)
        self._token = token
        self.sdk = LabelStudio(base_url=self.url, api_key=token, timeout=timeout)

    # ---- retry / error mapping ------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[[], Any], idempotent: bool = True) -> Any:
        """Run ``fn`` with retries and exponential backoff (with jitter); map failures to AnnotationError."""

        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - we classify below
                retry = _is_transient(exc) if idempotent else _is_connect_error(exc)
                if retry and attempt < self.retries:
                    delay = self.backoff * (2 ** attempt) * (1 + 0.2 * random.random())
                    log.info("%s: transient error (%s); retry %d/%d in %.1f s", what, type(exc).__name__,
                                attempt + 1, self.retries, delay)
                    time.sleep(delay)
                    attempt += 1
                    continue
                if isinstance(exc, AnnotationError):
                    raise
                raise AnnotationError(self._describe(what, exc)) from None

    def _describe(self, what: str, exc: BaseException) -> str:
        import httpx
        import requests
        from label_studio_sdk.core.api_error import ApiError

        status, body = None, None
        if isinstance(exc, ApiError):
            status, body = exc.status_code, exc.body
        elif isinstance(exc, requests.HTTPError) and exc.response is not None:
            status, body = exc.response.status_code, exc.response.text[:200]
        if status == 401:
            return f"{what}: Label Studio at {self.url} rejected the API token (401); check LABEL_STUDIO_API_KEY"
        if status == 403:
            return f"{what}: permission denied (403) by Label Studio at {self.url}"
        if status is not None:
            if isinstance(body, dict):
                detail = " ".join(str(body[k]) for k in ("detail", "validation_errors") if body.get(k))
            else:
                detail = body
            return f"{what}: Label Studio answered HTTP {status}: {str(detail)[:200]}"
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, requests.ConnectionError)):
            return (f"{what}: cannot reach Label Studio at {self.url} ({type(exc).__name__}); "
                    f"is the server running? (qwen-image-annotation server ...)")
        if isinstance(exc, (httpx.TransportError, requests.RequestException)):
            return f"{what}: connection to Label Studio at {self.url} failed ({type(exc).__name__}: {exc})"
        return f"{what}: {type(exc).__name__}: {exc}"

    # ---- API ------------------------------------------------------------------------------------------
    def whoami(self) -> dict:
        """Validate URL and token at once; returns the current user as a dict."""
        user = self.call("check token", lambda: self.sdk.users.whoami(request_options=_NO_SDK_RETRY))
        return user.model_dump() if hasattr(user, "model_dump") else dict(user)

    def find_project(self, title: str) -> int | None:
        def go():
            return [p for p in self.sdk.projects.list(title=title, page_size=100, request_options=_NO_SDK_RETRY)]
        matches = [p for p in self.call("list projects", go) if p.title == title]
        return min(p.id for p in matches) if matches else None

    def get_project(self, project_id: int) -> dict:
        try:
            p = self.call(f"get project {project_id}",
                          lambda: self.sdk.projects.get(id=project_id, request_options=_NO_SDK_RETRY))
        except AnnotationError as e:
            if "HTTP 404" in str(e):
                raise AnnotationError(f"unknown project {project_id} on {self.url}") from None
            raise
        return {"id": p.id, "title": p.title, "label_config": p.label_config,
                "maximum_annotations": p.maximum_annotations, "description": p.description}

    def create_project(self, title: str, label_config: str, maximum_annotations: int, description: str = "",
                       instructions: str | None = None) -> int:
        """``instructions``: shown to each rater before their first task (Label Studio's expert_instruction)."""
        extra = {"expert_instruction": instructions, "show_instruction": True} if instructions else {}
        p = self.call("create project", lambda: self.sdk.projects.create(
            title=title, label_config=label_config, description=description,
            maximum_annotations=maximum_annotations, overlap_cohort_percentage=100, show_skip_button=True,
            **extra, request_options=_NO_SDK_RETRY), idempotent=False)
        return p.id

    def set_instructions(self, project_id: int, instructions: str) -> None:
        self.call("set instructions", lambda: self.sdk.projects.update(
            id=project_id, expert_instruction=instructions, show_instruction=True, request_options=_NO_SDK_RETRY))

    def instructions(self, project_id: int) -> str | None:
        p = self.call(f"get project {project_id}",
                      lambda: self.sdk.projects.get(id=project_id, request_options=_NO_SDK_RETRY))
        return p.expert_instruction

    def create_task_view(self, project_id: int, title: str, hidden: list[str]) -> None:
        """A task-list tab (shared by every user of the project) hiding the columns in ``hidden``
        (``tasks:data.KEY``, ``tasks:FIELD``), so the prompt and the images are in view."""
        import requests

        def go():
            r = requests.post(f"{self.url}/api/dm/views/", headers={"Authorization": f"Token {self._token}"},
                              json={"project": project_id, "data": {
                                  "title": title, "type": "list", "target": "tasks",
                                  "hiddenColumns": {"explore": hidden, "labeling": hidden}}},
                              timeout=self.timeout)
            r.raise_for_status()
        self.call("create the task list view", go, idempotent=False)

    def local_storages(self, project_id: int) -> list[dict]:
        items = self.call("list storages", lambda: self.sdk.import_storage.local.list(
            project=project_id, request_options=_NO_SDK_RETRY))
        return [{"id": s.id, "path": s.path} for s in items]

    def ensure_local_storage(self, project_id: int, path: Path) -> None:
        path = Path(path).resolve()
        if any(Path(s["path"]) == path for s in self.local_storages(project_id)):
            return
        self.call("create local-files storage", lambda: self.sdk.import_storage.local.create(
            project=project_id, path=str(path), title=f"images {path.name}", use_blob_urls=False,
            request_options=_NO_SDK_RETRY), idempotent=False)

    def import_tasks(self, project_id: int, tasks: list[dict]) -> int:
        r = self.call("import tasks", lambda: self.sdk.projects.import_tasks(
            id=project_id, request=tasks, return_task_ids=True, request_options=_NO_SDK_RETRY), idempotent=False)
        return int(getattr(r, "task_count", None) or len(tasks))

    def export(self, project_id: int) -> list[dict]:
        """All tasks (annotated or not) with their annotations, as Label Studio's JSON export."""
        self.get_project(project_id)

        def go():
            chunks = self.sdk.projects.exports.download_sync(
                id=project_id, export_type="JSON", download_all_tasks=True,
                request_options={**_NO_SDK_RETRY, "timeout": self.timeout})
            return json.loads(b"".join(chunks))
        return self.call(f"export project {project_id}", go)

    def users(self) -> dict[int, str]:
        """user id -> email."""
        items = self.call("list users", lambda: self.sdk.users.list(request_options=_NO_SDK_RETRY))
        return {u.id: (u.email or u.username or str(u.id)) for u in items}

    def fetch(self, url: str) -> bytes:
        """Download an image referenced by a task: server-relative URLs carry the token, external ones do not."""
        import requests
        full = url if "://" in url else self.url + "/" + url.lstrip("/")
        headers = {"Authorization": f"Token {self._token}"} if full.startswith(self.url + "/") else {}

        def go():
            r = requests.get(full, headers=headers, timeout=self.timeout)
            r.raise_for_status()
            return r.content
        return self.call(f"download {url}", go)
