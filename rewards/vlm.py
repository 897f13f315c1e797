"""``vlm_judge``: score images with a VLM behind an OpenAI-compatible ``/v1/chat/completions`` endpoint
(e.g. UnifiedReward or Qwen2.5-VL served by sglang / vLLM).

Each image is sent as a base64 PNG data URL with a scoring prompt; the number after ``Final Score:`` is
parsed and mapped to [0, 1]. Timeouts, retries with exponential backoff, and ``None`` for any sample that
still fails, so one flaky request never kills a training step. The API key is read from an environment
variable at call time, sent only in the ``Authorization`` header, and never stored or logged.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from .images import to_pil
from .registry import register_reward

__all__ = ["VLMJudge", "DEFAULT_JUDGE_PROMPT", "parse_score"]

log = logging.getLogger(__name__)

DEFAULT_JUDGE_PROMPT = (
    "You are an expert judge of text-to-image generation. Given the prompt and the generated image, rate "
    "how faithfully the image follows the prompt (objects, attributes, layout, and any text it must render, "
    "spelled exactly) and its visual quality. Give a one-sentence justification, then end with a line "
    "'Final Score: X' where X is a number from 1 to 5.\n\nPrompt: {prompt}"
)

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class _Defaults(dict):
    def __missing__(self, key):
        return "{" + key + "}"


def parse_score(text: str, pattern: str = r"final\s*score\s*[:：]\s*([-+]?\d+(?:\.\d+)?)") -> float | None:
    """The number captured by ``pattern`` (case-insensitive, last match wins); if the reply is only a number,
    that number; else None."""
    if not text:
        return None
    hits = re.findall(pattern, text, flags=re.IGNORECASE)
    if hits:
        return float(hits[-1])
    bare = text.strip()
    if re.fullmatch(r"[-+]?\d+(?:\.\d+)?", bare):
        return float(bare)
    return None


def _chat_url(base_url: str) -> str:
    u = base_url.rstrip("/")
    return u if u.endswith("/chat/completions") else u + "/chat/completions"


@register_reward("vlm_judge")
class VLMJudge:
    """VLM-as-judge reward. Range [0, 1]: ``(score - min_score) / (max_score - min_score)`` of the parsed
    ``Final Score`` (default scale 1-5, so 1 -> 0.0, 5 -> 1.0); None when the request fails after all
    retries, the reply has no score, or the score is outside [min_score, max_score].

    Args:
        base_url: ``http://host:port/v1`` (``/chat/completions`` is appended) or the full URL; default from
            env ``VLM_JUDGE_URL``.
        model: the served model name (``"default"`` works for sglang).
        api_key_env: name of the env var holding the API key (default ``VLM_JUDGE_API_KEY``; unset = no auth).
        prompt_template: ``str.format`` template; ``{prompt}`` and any per-sample column (``{text}``...) fill in.
        timeout: seconds per request; max_retries: extra attempts after the first on connection errors,
            timeouts, 408/429/5xx; backoff: first sleep in seconds, doubled each retry (+ up to 10% jitter).
        image_size: the longer image side is resized to this (None keeps it); max_workers: parallel requests.
        normalize: False returns the raw parsed score instead.
    """

    def __init__(self, base_url: str | None = None, model: str = "default", *, api_key_env: str = "VLM_JUDGE_API_KEY",
                 prompt_template: str = DEFAULT_JUDGE_PROMPT, score_pattern: str | None = None,
                 min_score: float = 1.0, max_score: float = 5.0, normalize: bool = True, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 1.0, image_size: int | None = 512, max_workers: int = 4,
                 max_tokens: int = 512, temperature: float = 0.0, extra_body: dict | None = None):
        base_url = base_url or os.environ.get("VLM_JUDGE_URL")
        if not base_url:
            raise ValueError("vlm_judge: pass base_url='http://host:port/v1' or set VLM_JUDGE_URL")
        if max_score <= min_score:
            raise ValueError("vlm_judge: max_score must be greater than min_score")
        self.url = _chat_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.prompt_template = prompt_template
        self.score_pattern = score_pattern
        self.min_score, self.max_score, self.normalize = float(min_score), float(max_score), normalize
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)
        self.image_size, self.max_workers = image_size, max(1, int(max_workers))
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.extra_body = dict(extra_body or {})

    def __repr__(self) -> str:  # never include the key
        return f"VLMJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _encode(self, image: Any) -> str:
        im = to_pil(image)
        if self.image_size and max(im.size) != self.image_size:
            s = self.image_size / max(im.size)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def _payload(self, prompt: str, image: Any, fields: dict) -> dict:
        text = self.prompt_template.format_map(_Defaults(fields, prompt=prompt))
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": self._encode(image)}},
                {"type": "text", "text": text},
            ]}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        body.update(self.extra_body)
        return body

    def _post(self, body: dict) -> str | None:
        import requests

        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.max_retries + 1):
            retry = False
            try:
                r = requests.post(self.url, json=body, headers=headers, timeout=self.timeout)
                if r.status_code == 200:
                    msg = r.json()["choices"][0]["message"]["content"]
                    if isinstance(msg, list):  # content parts
                        msg = "".join(p.get("text", "") for p in msg if isinstance(p, dict))
                    return msg if isinstance(msg, str) else None
                retry = r.status_code in _RETRY_STATUS
                log.warning("vlm_judge: HTTP %s from %s (attempt %d)", r.status_code, self.url, attempt + 1)
            except (requests.ConnectionError, requests.Timeout) as e:
                retry = True
                log.warning("vlm_judge: %s calling %s (attempt %d)", type(e).__name__, self.url, attempt + 1)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                log.warning("vlm_judge: malformed reply from %s (%s)", self.url, type(e).__name__)
                return None
            if not retry or attempt == self.max_retries:
                return None
            time.sleep(self.backoff * (2 ** attempt) * (1 + 0.1 * random.random()))
        return None  # pragma: no cover

    def score_one(self, prompt: str, image: Any, **fields: Any) -> float | None:
        """Score one (prompt, image); None on failure."""
        try:
            reply = self._post(self._payload(prompt, image, fields))
        except Exception as e:  # noqa: BLE001 - a bad image must not kill the batch
            log.warning("vlm_judge: %s preparing the request", type(e).__name__)
            return None
        s = parse_score(reply, self.score_pattern) if self.score_pattern else parse_score(reply or "")
        if s is None or not (self.min_score <= s <= self.max_score):
            if reply is not None:
                log.warning("vlm_judge: no valid score in the reply")
            return None
        return (s - self.min_score) / (self.max_score - self.min_score) if self.normalize else s

    def __call__(self, prompts: list[str], images: list[Image.Image], **columns: Any) -> list[float | None]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        per = [{k: v[i] for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) == len(prompts)}
               for i in range(len(prompts))]
        if self.max_workers == 1 or len(prompts) <= 1:
            return [self.score_one(p, im, **f) for p, im, f in zip(prompts, images, per)]
        with ThreadPoolExecutor(self.max_workers) as ex:
            return list(ex.map(lambda a: self.score_one(a[0], a[1], **a[2]), zip(prompts, images, per)))
