"""vlm_judge against a tiny OpenAI-compatible server on 127.0.0.1 (http.server in a thread)."""

import base64
import io
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from rewards import VLMJudge, get_reward, parse_score

KEY = "sk-test-secret-123"


class _State:
    def __init__(self):
        self.requests = []
        self.hits = {}
        self.lock = threading.Lock()


def _make_handler(state):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _reply(self, code, content=None):
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out first ("slow")
                pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            mode = self.path.split("/")[1]
            with state.lock:
                state.requests.append((self.path, dict(self.headers), body))
                state.hits[mode] = state.hits.get(mode, 0) + 1
                n = state.hits[mode]
            if mode == "ok":
                # score depends on the image so the test can check order: red image -> 4, else 2
                url = body["messages"][0]["content"][0]["image_url"]["url"]
                im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
                score = 4 if im.getpixel((0, 0))[0] > 200 else 2
                self._reply(200, f"The text matches.\nFinal Score: {score}")
            elif mode == "fail":
                self._reply(500, None)
            elif mode == "flaky":
                self._reply(503) if n <= 2 else self._reply(200, "Final Score: 5")
            elif mode == "garbage":
                self._reply(200, "I cannot rate this image.")
            elif mode == "outofrange":
                self._reply(200, "Final Score: 9")
            elif mode == "denied":
                self._reply(401)
            elif mode == "slow":
                time.sleep(1.0)
                self._reply(200, "Final Score: 5")

    return H


@pytest.fixture(scope="module")
def server():
    state = _State()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()
    srv.server_close()


IMGS = [Image.new("RGB", (64, 32), "red"), Image.new("RGB", (64, 32), "blue")]


def test_parse_score():
    assert parse_score("blah\nFinal Score: 4.5") == 4.5
    assert parse_score("final score：3") == 3.0
    assert parse_score("Final Score: 2 ... Final Score: 5") == 5.0
    assert parse_score(" 3 ") == 3.0
    assert parse_score("no number here") is None
    assert parse_score("") is None


def test_scores_and_request_format(server, monkeypatch, caplog):
    url, state = server
    monkeypatch.setenv("VLM_JUDGE_API_KEY", KEY)
    judge = get_reward("vlm_judge", base_url=f"{url}/ok/v1", model="judge-7b", image_size=128, max_workers=2,
                       prompt_template="Rate it. Prompt: {prompt} Text: {text}")
    with caplog.at_level(logging.DEBUG):
        out = judge(['a poster "Hi"', "a blue wall"], IMGS, text=["Hi", None])
    assert out == [pytest.approx(0.75), pytest.approx(0.25)]  # (4-1)/4, (2-1)/4
    reqs = [r for r in state.requests if r[0].startswith("/ok/")]
    assert len(reqs) == 2
    path, headers, body = reqs[0]
    assert path == "/ok/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert body["model"] == "judge-7b"
    parts = body["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1])))
    assert max(im.size) == 128
    texts = sorted(b["messages"][0]["content"][1]["text"] for _, _, b in reqs)
    assert 'Rate it. Prompt: a poster "Hi" Text: Hi' in texts
    assert KEY not in repr(judge) and KEY not in caplog.text
    raw = VLMJudge(f"{url}/ok/v1", normalize=False)(["x"], IMGS[:1])
    assert raw == [4.0]


def test_failures_give_none(server, monkeypatch, caplog):
    url, state = server
    monkeypatch.setenv("VLM_JUDGE_API_KEY", KEY)
    kw = dict(max_retries=2, backoff=0.01, max_workers=1)
    with caplog.at_level(logging.WARNING):
        assert VLMJudge(f"{url}/fail/v1", **kw)(["a"], IMGS[:1]) == [None]
    assert state.hits["fail"] == 3  # first try + 2 retries
    assert KEY not in caplog.text and "HTTP 500" in caplog.text
    assert VLMJudge(f"{url}/flaky/v1", **kw)(["a"], IMGS[:1]) == [1.0]  # recovers on the 3rd try
    assert VLMJudge(f"{url}/garbage/v1", **kw)(["a", "b"], IMGS) == [None, None]
    assert VLMJudge(f"{url}/outofrange/v1", **kw)(["a"], IMGS[:1]) == [None]
    assert VLMJudge(f"{url}/denied/v1", **kw)(["a"], IMGS[:1]) == [None]
    assert state.hits["denied"] == 1  # 401 is not retried
    t0 = time.time()
    assert VLMJudge(f"{url}/slow/v1", timeout=0.2, max_retries=1, backoff=0.01)(["a"], IMGS[:1]) == [None]
    assert time.time() - t0 < 0.9
    # nothing listening at all
    assert VLMJudge("http://127.0.0.1:9/v1", max_retries=0, timeout=0.5)(["a"], IMGS[:1]) == [None]


def test_needs_url(monkeypatch):
    monkeypatch.delenv("VLM_JUDGE_URL", raising=False)
    with pytest.raises(ValueError, match="base_url"):
        VLMJudge()
    monkeypatch.setenv("VLM_JUDGE_URL", "http://127.0.0.1:1/v1/chat/completions")
    assert VLMJudge().url == "http://127.0.0.1:1/v1/chat/completions"
