"""A machine with no PostgreSQL and no Redis: the demo starts its own and stops them.

Run in a network namespace with only loopback (`unshare -n`), where nothing answers on the
default ports whatever this machine runs; the machine's own servers are never touched (the
namespace has its own loopback, and the servers started there use no Unix socket).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from moderation.local_services import DIRECTORY_ENV, answers, stop_all

pytestmark = pytest.mark.isolated

REPO = Path(__file__).resolve().parent.parent


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return probe.returncode == 0


needs_netns = pytest.mark.skipif(
    not _can_unshare(), reason="needs `unshare -n` and `ip` (root, or user namespaces)"
)


@pytest.fixture
def local_dir() -> Iterator[Path]:
    """Under /tmp, not pytest's tmp_path: as root, PostgreSQL runs as `nobody`, which
    cannot pass through pytest's root-only directories."""
    directory = Path(tempfile.mkdtemp(prefix="moderation-local-"))
    yield directory
    stop_all(directory)  # whatever a failed run left behind, from outside the namespace
    shutil.rmtree(directory, ignore_errors=True)


def _isolated(command: str, home: Path, local_dir: Path) -> subprocess.CompletedProcess[str]:
    """`command` in a network namespace with only loopback, as a user with nothing
    configured and no models downloaded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env.update({"HOME": str(home), "HF_HOME": str(home / "hf"), DIRECTORY_ENV: str(local_dir)})
    return subprocess.run(
        ["unshare", "-n", "sh", "-c", f"ip link set lo up && {command}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _machine_servers() -> tuple[bool, bool]:
    return answers("127.0.0.1", 5432), answers("127.0.0.1", 6379)


@needs_netns
def test_the_demo_starts_postgres_and_redis_where_none_answers_and_stops_them(
    tmp_path: Path, local_dir: Path
) -> None:
    before = _machine_servers()

    result = _isolated(f"{sys.executable} -m moderation demo", tmp_path, local_dir)

    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert "started PostgreSQL on 127.0.0.1:5432" in output
    assert "started Redis on 127.0.0.1:6379" in output
    # The whole demo ran against them: real SQL, a real worker over Redis.
    assert "9 uploads: 7 screened, 2 refused as bad input; 4 matched the bank" in output
    # Stopped afterwards: no server left behind holding the data directory.
    assert not (local_dir / "postgres" / "data" / "postmaster.pid").exists()
    assert not (local_dir / "redis" / "redis.pid").exists()
    assert stop_all(local_dir) == []
    assert _machine_servers() == before  # the machine's own servers, untouched


@needs_netns
def test_started_servers_keep_running_until_stopped_and_keep_their_data(
    tmp_path: Path, local_dir: Path
) -> None:
    services = f"{sys.executable} -m moderation services"
    moderation = f"{sys.executable} -m moderation"
    script = " && ".join(
        [
            f"{services} start",
            f"{moderation} db upgrade",
            f"{moderation} bank create kept",
            f"{services} stop",
            f"{services} start",  # the same data directory: the bank is still there
            f"{moderation} bank list",
            f"{services} status",
            f"{services} stop",
            f"{services} status",
        ]
    )
    result = _isolated(script, tmp_path, local_dir)
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert output.count("started PostgreSQL on 127.0.0.1:5432") == 2
    assert "kept" in output.split("stopped PostgreSQL and Redis")[1]
    assert f"PostgreSQL at 127.0.0.1:5432 answers (ours, in {local_dir})" in output
    assert "PostgreSQL at 127.0.0.1:5432 does not answer" in output
    assert "Redis at 127.0.0.1:6379 does not answer" in output
