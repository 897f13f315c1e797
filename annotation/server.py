"""Start a local Label Studio server from its own virtualenv (see install_labelstudio.sh).

Nothing is installed here: the server venv is given by ``--venv`` or ``LABEL_STUDIO_VENV``
(default ``~/.cache/qwen-image-align/labelstudio-venv``). SQLite in the data dir by default; for a team,
``database="postgresql"`` runs a local PostgreSQL cluster in ``DATA_DIR/postgres`` (started before and stopped
after Label Studio), or ``database="postgresql://..."`` uses a given one (annotation/postgres.py).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AnnotationError, register_secret

LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_VENV = Path.home() / ".cache" / "qwen-image-align" / "labelstudio-venv"
INSTALL_SCRIPT = Path(__file__).with_name("install_labelstudio.sh")
DEFAULT_ADMIN = "admin@example.com"

# Label Studio's get_env() falls back to these bare names: never let the caller's shell leak into the server.
_SHADOWED_ENV = ("USERNAME", "PASSWORD", "PORT", "HOST")


def venv_path(venv: str | os.PathLike | None = None) -> Path:
    return Path(venv or os.environ.get("LABEL_STUDIO_VENV") or DEFAULT_VENV).expanduser()


def label_studio_executable(venv: str | os.PathLike | None = None) -> Path:
    exe = venv_path(venv) / "bin" / "label-studio"
    if not exe.exists():
        raise AnnotationError(
            f"no Label Studio server in {venv_path(venv)}; install it with: "
            f"LABEL_STUDIO_VENV={venv_path(venv)} bash {INSTALL_SCRIPT}")
    return exe


def template_db(venv: str | os.PathLike | None = None, create: bool = True) -> Path | None:
    """A migrated, user-less SQLite database cached in the server venv (built once, ~35-90 s).

    Copying it into a fresh data dir turns a first start (all migrations) into a restart (~5 s).
    Returns None when it does not exist and ``create`` is False, or when it cannot be built.
    """
    path = venv_path(venv) / "qwen-image-align-template" / "label_studio.sqlite3"
    if path.exists() or not create:
        return path if path.exists() else None
    python = venv_path(venv) / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import label_studio, os; print(os.path.dirname(label_studio.__file__))"],
                          capture_output=True, text=True)
    if site.returncode != 0:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
    env = {k: v for k, v in os.environ.items() if k not in _SHADOWED_ENV and not k.startswith(("DJANGO_DB", "POSTGRE"))}
    env.update({"PYTHONPATH": site.stdout.strip(), "LABEL_STUDIO_BASE_DATA_DIR": str(tmp),
                "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", "SENTRY_DSN": ""})
    try:
        r = subprocess.run([str(python), "-m", "label_studio.manage", "migrate", "--noinput"], env=env,
                           cwd=str(tmp), capture_output=True, text=True)
        if r.returncode != 0 or not (tmp / "label_studio.sqlite3").exists():
            return None
        os.replace(tmp / "label_studio.sqlite3", path)
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def health(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200 and b"UP" in r.read()
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _secret_file(path: Path, given: str | None, nbytes: int) -> str:
    """Use the given secret (and store it), else reuse the stored one, else create one. File mode 0600."""
    if given:
        value = given
    elif path.exists():
        value = path.read_text().strip()
    else:
        value = secrets.token_hex(nbytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    register_secret(value)
    return value


@dataclass
class LabelStudioServer:
    """A running (or startable) Label Studio process. ``start()``/``stop()`` may be called repeatedly."""

    data_dir: Path
    port: int
    document_root: Path | None = None
    venv: Path | None = None
    username: str = DEFAULT_ADMIN
    password: str | None = None
    token: str | None = None
    host: str = "127.0.0.1"
    use_template: bool = True
    database: str = "sqlite"          # "sqlite", "postgresql" (local cluster) or a postgresql:// URL
    proc: subprocess.Popen | None = field(default=None, repr=False)
    postgres: object | None = field(default=None, repr=False)

    def __post_init__(self):
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if self.document_root is not None:
            self.document_root = Path(self.document_root).expanduser().resolve()
        self.token = _secret_file(self.data_dir / "admin_token", self.token, 20)
        self.password = _secret_file(self.data_dir / "admin_password", self.password, 12)
        if self.database == "postgresql":
            from .postgres import LocalPostgres
            port_file = self.data_dir / "postgres_port"
            pg_port = int(port_file.read_text()) if port_file.exists() else free_port()
            port_file.write_text(f"{pg_port}\n")
            self.postgres = LocalPostgres(self.data_dir / "postgres", pg_port,
                                          _secret_file(self.data_dir / "postgres_password", None, 16))
        elif self.database.startswith(("postgresql:", "postgres:")):
            from .postgres import url_env
            url_env(self.database)                    # a malformed URL fails before anything starts
        elif self.database != "sqlite":
            raise AnnotationError(f"--database {self.database!r}: use sqlite, postgresql (a local cluster) or "
                                  f"postgresql://USER:PASSWORD@HOST:PORT/NAME")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "label-studio.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SHADOWED_ENV}
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": env.get("LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK", "true"),
            "LATEST_VERSION_CHECK": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false",
        })
        if self.postgres is not None:
            env.update(self.postgres.env())
        elif self.database != "sqlite":
            from .postgres import url_env
            env.update(url_env(self.database))
            register_secret(env["POSTGRE_PASSWORD"])
        else:   # the caller's shell must not switch the database behind the flag's back
            for k in [k for k in env if k.startswith(("DJANGO_DB", "LABEL_STUDIO_DJANGO_DB", "POSTGRE"))]:
                del env[k]
        if self.document_root is not None:
            env["LOCAL_FILES_SERVING_ENABLED"] = "true"
            env["LOCAL_FILES_DOCUMENT_ROOT"] = str(self.document_root)
        return env

    def start(self, wait: float = 180.0) -> "LabelStudioServer":
        exe = label_studio_executable(self.venv)
        if self.proc is not None and self.proc.poll() is None:
            return self
        if port_in_use(self.port, self.host):
            raise AnnotationError(f"port {self.port} is already in use on {self.host}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        db = self.data_dir / "label_studio.sqlite3"
        if self.use_template and self.database == "sqlite" and not db.exists():
            template = template_db(self.venv)
            if template is not None:
                shutil.copyfile(template, db)
        if self.postgres is not None:
            self.postgres.start()
        log = open(self.log_path, "ab")
        cmd = [str(exe), "start", "--no-browser", "--port", str(self.port), "--internal-host", self.host]
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=str(self.data_dir), start_new_session=True)
        log.close()
        self.wait_healthy(wait)
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise AnnotationError(f"Label Studio exited with code {self.proc.returncode} during start-up "
                                      f"(log {self.log_path}): {tail[0][:200]}")
            if health(self.url):
                return
            time.sleep(0.5)
        raise AnnotationError(f"Label Studio at {self.url} not healthy after {timeout:.0f} s (log {self.log_path})")

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the server process (one Django process; SIGTERM, then SIGKILL), then the local PostgreSQL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self.postgres is not None:
            self.postgres.stop()

    def kill(self) -> None:
        """Hard kill (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
