"""Helpers for the Label Studio tests: a real server on a free loopback port, real annotator users.

Annotators are created through the signup invite link (docs/annotation.md), so each has its
own session and its own API token, and posts its annotations itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import requests

from annotation.server import LabelStudioServer, free_port, venv_path


def require_label_studio() -> None:
    """Skip when the server venv is absent (local runs); under CI it must be there."""
    exe = venv_path() / "bin" / "label-studio"
    if exe.exists():
        return
    msg = (f"Label Studio server venv not found at {venv_path()} (set LABEL_STUDIO_VENV or run "
           f"`bash annotation/install_labelstudio.sh`)")
    if os.environ.get("CI"):
        pytest.fail(msg + " -- required under CI")
    pytest.skip(msg)


def start_server(tmp_root) -> LabelStudioServer:
    require_label_studio()
    doc_root = tmp_root / "docroot"
    doc_root.mkdir(parents=True, exist_ok=True)
    srv = LabelStudioServer(tmp_root / "ls-data", free_port(), document_root=doc_root)
    srv.start(wait=240)
    return srv


@dataclass
class Annotator:
    email: str
    token: str
    user_id: int


def signup(url: str, admin_token: str, email: str, password: str = "Qwen-Image-2026!") -> Annotator:
    invite = requests.get(f"{url}/api/invite", headers={"Authorization": f"Token {admin_token}"}, timeout=30)
    invite.raise_for_status()
    s = requests.Session()
    s.get(f"{url}/user/signup/", timeout=30)
    r = s.post(f"{url}/user/signup/", params={"token": invite.json()["token"]},
               data={"email": email, "password": password, "csrfmiddlewaretoken": s.cookies["csrftoken"]},
               allow_redirects=False, timeout=30)
    assert r.status_code == 302, f"signup of {email} failed: HTTP {r.status_code}"
    token = s.get(f"{url}/api/current-user/token", timeout=30).json()["token"]
    me = requests.get(f"{url}/api/current-user/whoami", headers={"Authorization": f"Token {token}"}, timeout=30)
    me.raise_for_status()
    return Annotator(email, token, me.json()["id"])


def pairwise_result(choice: str) -> list[dict]:
    if choice == "both_bad":
        return [{"type": "choices", "value": {"choices": ["both_bad"]}, "from_name": "both_bad", "to_name": "img_a"}]
    return [{"type": "pairwise", "value": {"selected": choice}, "from_name": "pref", "to_name": "pref"}]


def rating_result(stars: int) -> list[dict]:
    return [{"type": "rating", "value": {"rating": stars}, "from_name": "quality", "to_name": "image"}]


def annotate(url: str, token: str, task_id: int, result: list[dict] | None, cancelled: bool = False) -> dict:
    """POST one annotation as the user owning ``token`` (``cancelled``: a skipped task)."""
    body = {"result": result or [], "was_cancelled": cancelled}
    r = requests.post(f"{url}/api/tasks/{task_id}/annotations/", json=body,
                      headers={"Authorization": f"Token {token}"}, timeout=30)
    assert r.status_code == 201, r.text[:300]
    return r.json()


def task_ids_by(url: str, token: str, project_id: int, key: str) -> dict[str, int]:
    r = requests.get(f"{url}/api/projects/{project_id}/export", params={"exportType": "JSON",
                     "download_all_tasks": "true"}, headers={"Authorization": f"Token {token}"}, timeout=60)
    r.raise_for_status()
    return {t["data"][key]: t["id"] for t in r.json()}
