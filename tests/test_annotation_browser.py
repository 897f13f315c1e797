"""A rater in a real browser (Debian's Chromium driven by Playwright) against the real Label Studio server.

The rater logs in, reads the instructions set by ``push --instructions``, sees the prompt and both images, picks
with the keyboard on one task, with a click on an image on another, says "both bad" on a third, rates an image and
judges an edit; ``pull`` must give back exactly those choices. Screenshots at 1280x800 (task list, a pairwise
task, a rating task, an edit pair) go to ``$TEST_ARTIFACTS_DIR/annotation-browser`` (default ``test-artifacts/``
in the checkout); docs/annotation.md shows them. Skipped, with the reason, only when Chromium or Playwright is
missing (``scripts/test.sh`` installs both).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from annotation_helpers import signup, start_server  # noqa: E402

from annotation.cli import main  # noqa: E402

pytestmark = pytest.mark.slow  # processes / long runs: `-m "not slow"` skips them

VIEWPORT = {"width": 1280, "height": 800}
PASSWORD = "Qwen-Image-2026!"
INSTRUCTIONS = "<b>Better</b> means the slogan is spelled right and easy to read."
PROMPTS = {f"T{i}": f"a red shop poster that says 'SALE {i}' in bold letters" for i in range(1, 4)}
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", Path(__file__).resolve().parents[1] / "test-artifacts"))
ARTIFACTS = ARTIFACTS / "annotation-browser"


def chromium_path() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install -e '.[test]'; scripts/test.sh does it)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no system Chromium (apt-get install chromium; scripts/test.sh does it)")
    with sync_playwright() as pw:
        # root (CI) cannot use Chromium's sandbox
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"], timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def ls(tmp_path_factory, browser):
    srv = start_server(tmp_path_factory.mktemp("ls-browser"))
    try:
        yield srv
    finally:
        srv.stop()


def _poster(path: Path, color, text: str, size=(384, 256)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    ImageDraw.Draw(im).text((20, 20), text, fill=(255, 255, 255))
    im.save(path)


def _push(url: str, token: str, doc_root: Path, command: str, jsonl: Path, title: str) -> int:
    import contextlib
    import io

    buf = io.StringIO()
    os.environ["LABEL_STUDIO_API_KEY"] = token
    try:
        with contextlib.redirect_stdout(buf):
            rc = main([command, str(jsonl), "--title", title, "--url", url, "--document-root", str(doc_root),
                       "--instructions", INSTRUCTIONS])
    finally:
        del os.environ["LABEL_STUDIO_API_KEY"]
    assert rc == 0
    return json.loads(buf.getvalue())["project_id"]


@pytest.fixture(scope="module")
def projects(ls):
    run = ls.document_root / "browser"
    rows = []
    for i, (pid, prompt) in enumerate(PROMPTS.items()):
        _poster(run / f"{pid}_a.png", (190, 40 + 30 * i, 40), f"SALE {i + 1}  (A)")
        _poster(run / f"{pid}_b.png", (40, 40 + 30 * i, 190), f"SAEL {i + 1}  (B)")
        rows.append({"pair_id": pid, "prompt": prompt, "image_a": f"{pid}_a.png", "image_b": f"{pid}_b.png"})
    (run / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "candidates.jsonl").write_text(json.dumps({"candidate_id": "C1", "prompt": PROMPTS["T1"],
                                                      "image": "T1_a.png"}) + "\n")
    _poster(run / "source.png", (30, 120, 30), "source", size=(320, 320))
    (run / "edits.jsonl").write_text(json.dumps({
        "pair_id": "E1", "prompt": "write 'OPEN' on the door in white", "control_images": ["source.png"],
        "image_a": "T2_a.png", "image_b": "T2_b.png"}) + "\n")
    push = [("pairs", "push-pairs", "pairs.jsonl"), ("ratings", "push-ratings", "candidates.jsonl"),
            ("edit", "push-pairs", "edits.jsonl")]
    return {k: _push(ls.url, ls.token, ls.document_root, cmd, run / f, f"browser {k}") for k, cmd, f in push}


@pytest.fixture(scope="module")
def page(ls, browser):
    rater = signup(ls.url, ls.token, "browser.rater@example.com", PASSWORD)
    ctx = browser.new_context(viewport=VIEWPORT)
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(f"{ls.url}/user/login/")
    pg.fill("input[name=email]", rater.email)
    pg.fill("input[name=password]", PASSWORD)
    pg.click("button[type=submit]")
    pg.wait_for_url(lambda u: "/user/login" not in u)
    pg.rater = rater
    try:
        yield pg
    finally:
        ctx.close()


def _shot(pg, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    pg.screenshot(path=str(path))
    return path


def _open_stream(pg, url: str, project_id: int) -> None:
    """The labeling stream; the instructions come first (once per session), then the task."""
    pg.goto(f"{url}/projects/{project_id}/data?labeling=1")
    modal = pg.get_by_text("slogan is spelled right")
    modal.wait_for()
    pg.locator(".lsf-modal-ls").get_by_role("button").first.click()   # its close button
    modal.wait_for(state="hidden")
    pg.locator(".qia-prompt").wait_for()


def _above_the_fold(pg, *locators) -> None:
    for loc in locators:
        box = loc.bounding_box()
        assert box is not None and box["height"] > 0, f"{loc} not rendered"
        assert 0 <= box["y"] and box["y"] + box["height"] <= VIEWPORT["height"], f"{loc} is below the fold: {box}"


def _images_loaded(pg, n: int) -> None:
    """Label Studio draws each image into its own <img>; wait until all n have their pixels."""
    pg.wait_for_function(f"""() => {{
        const imgs = [...document.querySelectorAll('.qia-row img')].filter(i => i.naturalWidth > 0);
        return imgs.length >= {n};
    }}""")


def _current_pair(pg) -> str:
    text = pg.locator(".qia-prompt").inner_text()
    return next(pid for pid, prompt in PROMPTS.items() if prompt in text)


def _submit_and_wait(pg, before: str, key: bool) -> None:
    if key:
        pg.keyboard.press("Control+Enter")
    else:
        pg.get_by_test_id("bottombar-submit-button").click()
    pg.wait_for_function("t => !document.querySelector('.qia-prompt') || "
                         "!document.querySelector('.qia-prompt').innerText.includes(t)", arg=before)


def _pull(ls, project_id: int, out: Path) -> dict:
    os.environ["LABEL_STUDIO_API_KEY"] = ls.token
    try:
        rc = main(["pull", "--project-id", str(project_id), "--out", str(out), "--url", ls.url, "--min-votes", "1"])
    finally:
        del os.environ["LABEL_STUDIO_API_KEY"]
    assert rc == 0
    return json.loads((out / "summary.json").read_text())


def test_rater_labels_in_the_browser_and_pull_gets_exactly_that(ls, projects, page, tmp_path):
    pg = page
    pg.goto(f"{ls.url}/projects/{projects['pairs']}/data")
    pg.get_by_text(PROMPTS["T1"]).wait_for()          # the task list shows the prompt, not only ids
    pg.locator("img").first.wait_for()
    _shot(pg, "task-list.png")

    _open_stream(pg, ls.url, projects["pairs"])
    done = {}
    for step in ("key", "click", "both_bad"):
        _images_loaded(pg, 2)
        pair = _current_pair(pg)
        prompt = pg.get_by_text(PROMPTS[pair], exact=True)
        images = pg.locator(".qia-col img")
        assert images.count() == 2
        sizes = pg.locator(".qia-size")
        assert [sizes.nth(k).inner_text().strip() for k in range(2)] == ["384\u00d7256 px"] * 2
        verdict = pg.locator(".qia-verdict")
        _above_the_fold(pg, prompt, images.nth(0), images.nth(1), verdict, pg.get_by_test_id("bottombar-submit-button"),
                        pg.get_by_text("2 right", exact=False))
        if step == "key":
            pg.keyboard.press("2")                     # right is better
            expected = "right"
        elif step == "click":
            pg.locator(".qia-col").nth(0).locator(".cursor-pointer").first.click()
            expected = "left"
        else:
            pg.get_by_text("Both are bad").click()
            expected = "both_bad"
        if step == "click":
            _shot(pg, "pairwise-task.png")             # the chosen (left) image framed in green
        pg.wait_for_timeout(300)
        _submit_and_wait(pg, PROMPTS[pair], key=step == "key")
        done[pair] = expected
    assert len(done) == 3

    _open_stream(pg, ls.url, projects["ratings"])
    _images_loaded(pg, 1)
    _above_the_fold(pg, pg.get_by_text(PROMPTS["T1"], exact=True), pg.locator(".qia-col img").first,
                    pg.locator(".qia-col .ant-rate"))
    _shot(pg, "rating-task.png")
    pg.locator(".qia-col .ant-rate-star").nth(3).click()      # 4 stars
    _submit_and_wait(pg, PROMPTS["T1"], key=False)

    _open_stream(pg, ls.url, projects["edit"])
    _images_loaded(pg, 3)
    _above_the_fold(pg, pg.get_by_text("write 'OPEN' on the door in white", exact=True),
                    pg.locator(".qia-sources img").first, pg.locator(".qia-col img").nth(0),
                    pg.locator(".qia-col img").nth(1), pg.locator(".qia-verdict"))
    _shot(pg, "edit-pair.png")
    pg.keyboard.press("1")
    _submit_and_wait(pg, "write 'OPEN' on the door in white", key=True)

    pairs = _pull(ls, projects["pairs"], tmp_path / "pairs")
    assert pairs["votes_per_rater"] == {"browser.rater@example.com": 3}
    kept = {r["pair_id"]: r["chosen"] for r in map(json.loads, (tmp_path / "pairs" / "metadata.jsonl").open())}
    want = {p: ("a" if side == "left" else "b") for p, side in done.items() if side != "both_bad"}
    assert {p: c.rsplit("_", 1)[1][0] for p, c in kept.items()} == want
    assert pairs["outcomes"] == {"kept": 2, "ties": 0, "no_majority": 0, "both_bad": 1, "judged_same": 0,
                                 "too_few_votes": 0}
    ratings = _pull(ls, projects["ratings"], tmp_path / "ratings")
    assert ratings["rows"] == 1
    assert json.loads((tmp_path / "ratings" / "metadata.jsonl").read_text())["ratings"] == [4.0]
    _pull(ls, projects["edit"], tmp_path / "edit")
    edit_row = json.loads((tmp_path / "edit" / "metadata.jsonl").read_text())
    assert edit_row["pair_id"] == "E1" and edit_row["chosen"].endswith("_a.png")
    for name in ("task-list.png", "pairwise-task.png", "rating-task.png", "edit-pair.png"):
        with Image.open(ARTIFACTS / name) as im:
            assert im.size == (1280, 800)
