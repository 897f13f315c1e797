"""Team mode: Label Studio on a local PostgreSQL (``server --database postgresql``), six real annotators posting at
once through the API while ``pull`` runs: every annotation posted is pulled once, none lost, none counted twice.

Needs Debian's PostgreSQL (``apt-get install postgresql``; scripts/test.sh installs it). Skipped without it, except
under CI, where it fails. Loopback only; every request has a timeout, every loop a fixed count.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from annotation_helpers import pairwise_result, require_label_studio, signup  # noqa: E402

from annotation.cli import main  # noqa: E402
from annotation.errors import AnnotationError  # noqa: E402
from annotation.postgres import DB_NAME, DB_USER, postgres_bin, url_env  # noqa: E402
from annotation.server import LabelStudioServer, free_port  # noqa: E402

RATERS, TASKS = 6, 12


pytestmark = pytest.mark.slow  # processes / long runs: `-m "not slow"` skips them

def require_postgres() -> None:
    try:
        postgres_bin("initdb")
    except AnnotationError as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} -- required under CI")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def pg_server():
    require_label_studio()
    require_postgres()
    # PostgreSQL runs as the postgres user under root: its folder must be reachable (pytest's tmp is root-only)
    root = Path(tempfile.mkdtemp(prefix="qia-pg-test-"))
    os.chmod(root, 0o755)
    srv = LabelStudioServer(root / "ls-data", free_port(), document_root=root / "docroot", database="postgresql")
    (root / "docroot").mkdir()
    try:
        t0 = time.monotonic()
        srv.start(wait=300)
        srv.start_seconds = time.monotonic() - t0
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def _sql(srv: LabelStudioServer, query: str) -> str:
    pg = srv.postgres
    r = subprocess.run([str(postgres_bin("psql")), "-h", "127.0.0.1", "-p", str(pg.port), "-U", DB_USER, "-d",
                        DB_NAME, "-tAc", query], env={**os.environ, "PGPASSWORD": pg.password},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _cli(srv, *argv) -> int:
    os.environ["LABEL_STUDIO_API_KEY"] = srv.token
    try:
        return main([*map(str, argv), "--url", srv.url])
    finally:
        del os.environ["LABEL_STUDIO_API_KEY"]


def test_url_and_flag_mistakes_are_one_line_errors(tmp_path):
    assert url_env("postgresql://ls:s%40cret@db.internal:6543/labels") == {
        "DJANGO_DB": "postgresql", "POSTGRE_HOST": "db.internal", "POSTGRE_PORT": "6543", "POSTGRE_NAME": "labels",
        "POSTGRE_USER": "ls", "POSTGRE_PASSWORD": "s@cret"}
    with pytest.raises(AnnotationError, match="not a PostgreSQL URL"):
        LabelStudioServer(tmp_path / "d", 1, database="postgresql://only-a-host")
    with pytest.raises(AnnotationError, match="use sqlite, postgresql"):
        LabelStudioServer(tmp_path / "d", 1, database="mysql")


def test_concurrent_raters_on_postgresql_lose_and_double_nothing(pg_server, tmp_path, capsys):
    srv = pg_server
    assert not (srv.data_dir / "label_studio.sqlite3").exists()       # really on PostgreSQL
    run = srv.document_root / "team"
    rows = []
    for i in range(TASKS):
        for side, color in (("a", (200, 10 * i, 0)), ("b", (0, 10 * i, 200))):
            (run / "images").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), color).save(run / "images" / f"{i}_{side}.png")
        rows.append({"pair_id": f"Q{i}", "prompt": f"poster {i}", "image_a": f"images/{i}_a.png",
                     "image_b": f"images/{i}_b.png"})
    (run / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _cli(srv, "push-pairs", run / "pairs.jsonl", "--title", "team", "--raters", RATERS,
                "--document-root", srv.document_root) == 0
    pid = json.loads(capsys.readouterr().out)["project_id"]
    raters = [signup(srv.url, srv.token, f"team{k}@example.com") for k in range(RATERS)]
    tasks = requests.get(f"{srv.url}/api/projects/{pid}/export", params={"exportType": "JSON",
                         "download_all_tasks": "true"}, headers={"Authorization": f"Token {srv.token}"}, timeout=60)
    task_ids = [t["id"] for t in tasks.json()]
    assert len(task_ids) == TASKS

    def label(k: int) -> list[int]:
        """One rater works through every task in their own order, as people do; returns the ids it got back."""
        rng = random.Random(k)
        order = task_ids[:]
        rng.shuffle(order)
        s = requests.Session()
        s.headers["Authorization"] = f"Token {raters[k].token}"
        posted = []
        for tid in order:
            r = s.post(f"{srv.url}/api/tasks/{tid}/annotations/", timeout=60,
                       json={"result": pairwise_result(rng.choice(["left", "right", "both_bad"]))})
            assert r.status_code == 201, r.text[:200]
            posted.append(r.json()["id"])
        return posted

    t0 = time.monotonic()
    pulls = []
    with ThreadPoolExecutor(RATERS) as pool:
        futures = [pool.submit(label, k) for k in range(RATERS)]
        for _ in range(20):                           # pulls while they label (bounded: 20 at most)
            if all(f.done() for f in futures):
                break
            assert _cli(srv, "pull", "--project-id", pid, "--out", tmp_path / "mid", "--overwrite") == 0
            pulls.append(json.loads((tmp_path / "mid" / "summary.json").read_text())["annotations"])
        posted = [a for f in futures for a in f.result()]
    label_seconds = time.monotonic() - t0
    capsys.readouterr()

    assert _cli(srv, "pull", "--project-id", pid, "--out", tmp_path / "final") == 0
    summary = json.loads((tmp_path / "final" / "summary.json").read_text())
    n = RATERS * TASKS
    assert len(posted) == len(set(posted)) == n
    assert summary["annotations"] == summary["votes"] == n
    assert summary["duplicate_annotations"] == 0 and summary["tasks_with_duplicates"] == 0
    assert summary["tasks_by_votes"][str(RATERS)] == TASKS
    assert summary["votes_per_rater"] == {r.email: TASKS for r in raters}
    assert int(_sql(srv, "SELECT count(*) FROM task_completion")) == n                # in the database itself
    assert pulls and all(0 <= a <= n for a in pulls) and pulls == sorted(pulls)        # pulls saw a growing count
    print(f"\npostgresql: start {srv.start_seconds:.1f} s; {RATERS} raters x {TASKS} tasks = {n} annotations "
          f"posted in {label_seconds:.1f} s with {len(pulls)} pulls meanwhile (counts {pulls}); pulled {n}, "
          f"0 duplicates")
