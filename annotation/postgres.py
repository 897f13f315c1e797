"""PostgreSQL for a team's Label Studio: a local cluster the server command starts and stops, or a given URL.

Label Studio recommends PostgreSQL over SQLite from about five concurrent annotators, or when tasks are imported
while people label (SQLite locks the whole database on each write). ``--database postgresql`` runs Debian's
PostgreSQL (``apt-get install postgresql``) on a cluster kept in ``DATA_DIR/postgres``, listening on 127.0.0.1
only; ``--database postgresql://USER:PASSWORD@HOST:PORT/NAME`` uses the team's server instead.

PostgreSQL refuses to run as root: under root the cluster belongs to the ``postgres`` system user (created by the
Debian package) and its commands run through ``runuser``.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import AnnotationError

DB_NAME = "labelstudio"
DB_USER = "labelstudio"


def postgres_bin(name: str) -> Path:
    """A PostgreSQL program from Debian's versioned folder (the newest installed), else from PATH."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    found = shutil.which(name)
    if found is None:
        raise AnnotationError(f"PostgreSQL's {name} not found: install the server (apt-get install postgresql) "
                              f"or give --database postgresql://USER:PASSWORD@HOST:PORT/NAME")
    return Path(found)


def url_env(url: str) -> dict[str, str]:
    """Label Studio's settings for a ``postgresql://USER:PASSWORD@HOST:PORT/NAME`` URL."""
    u = urlparse(url)
    if u.scheme not in ("postgresql", "postgres") or not u.hostname or not u.path.strip("/"):
        raise AnnotationError(f"--database {u.scheme}://... is not a PostgreSQL URL "
                              f"(postgresql://USER:PASSWORD@HOST:PORT/NAME)")
    return {"DJANGO_DB": "postgresql", "POSTGRE_HOST": u.hostname, "POSTGRE_PORT": str(u.port or 5432),
            "POSTGRE_NAME": unquote(u.path.strip("/")), "POSTGRE_USER": unquote(u.username or "postgres"),
            "POSTGRE_PASSWORD": unquote(u.password or "")}


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in ``pgdata`` on 127.0.0.1:``port``, created on first start."""

    pgdata: Path
    port: int
    password: str
    owner: str | None = field(default=None)   # the system user running it (``postgres`` under root)

    def __post_init__(self):
        self.pgdata = Path(self.pgdata).resolve()
        if self.owner is None and os.geteuid() == 0:
            self.owner = "postgres"

    @property
    def log_path(self) -> Path:
        return self.pgdata.parent / "postgres.log"

    def _run(self, *cmd, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(c) for c in cmd]
        if self.owner:
            argv = ["runuser", "-u", self.owner, "--", *argv]
        r = subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=180)
        if check and r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            raise AnnotationError(f"PostgreSQL: {Path(argv[-len(cmd)]).name} failed ({r.returncode}): {tail[0][:200]}")
        return r

    def _prepare(self) -> None:
        """Make the cluster folder (and its log file) the owner's, and check the owner can reach it."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        if not self.owner:
            return
        user = pwd.getpwnam(self.owner)
        for p in (self.pgdata, self.log_path):
            os.chown(p, user.pw_uid, user.pw_gid)
        os.chmod(self.pgdata, 0o700)
        if self._run("test", "-w", self.pgdata, check=False).returncode != 0:
            raise AnnotationError(f"PostgreSQL runs as the {self.owner!r} user (it refuses root), which cannot "
                                  f"reach {self.pgdata}: choose a --data-dir whose parent folders everyone may "
                                  f"enter (chmod o+x), e.g. under /srv or /var/lib")

    def start(self) -> None:
        self._prepare()
        if not (self.pgdata / "PG_VERSION").exists():
            pwfile = self.pgdata.parent / ".pgpass-init"
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
            if self.owner:
                user = pwd.getpwnam(self.owner)
                os.chown(pwfile, user.pw_uid, user.pw_gid)
            try:
                self._run(postgres_bin("initdb"), "-D", self.pgdata, "-U", DB_USER, "--pwfile", pwfile,
                          "--auth=scram-sha-256", "-E", "UTF8", "--locale=C")
            finally:
                pwfile.unlink(missing_ok=True)
        # TCP on loopback only; the socket in the cluster folder (the system one may not exist or be writable)
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=200"
        self._run(postgres_bin("pg_ctl"), "start", "-D", self.pgdata, "-l", self.log_path, "-w", "-t", "60",
                  "-o", opts)
        env = {"PGPASSWORD": self.password}
        have = self._run(postgres_bin("psql"), "-h", "127.0.0.1", "-p", self.port, "-U", DB_USER, "-d", "postgres",
                         "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'", env=env)
        if have.stdout.strip() != "1":
            self._run(postgres_bin("createdb"), "-h", "127.0.0.1", "-p", self.port, "-U", DB_USER, DB_NAME, env=env)

    def stop(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self._run(postgres_bin("pg_ctl"), "stop", "-D", self.pgdata, "-m", "fast", "-w", "-t", "60", check=False)

    def env(self) -> dict[str, str]:
        return {"DJANGO_DB": "postgresql", "POSTGRE_HOST": "127.0.0.1", "POSTGRE_PORT": str(self.port),
                "POSTGRE_NAME": DB_NAME, "POSTGRE_USER": DB_USER, "POSTGRE_PASSWORD": self.password}
