"""Run `moderation worker` as a child process: for the demo, the benchmark and the tests,
which all need a real worker, started and stopped around their own work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children (Linux /proc), read once."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text()
        except OSError:  # it has exited
            continue
        parent = int(fields[fields.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(stat.parent.name))
    return children


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants: a worker with its forkserver and intake
    processes."""
    children = children_by_parent()
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += children.get(current, [])
    return tree


class WorkerProcess:
    def __init__(self, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moderation", "worker", "--loglevel", "INFO"],
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float = 300) -> WorkerProcess:
        """Block until the worker consumes messages (its model is loaded by then)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited while starting:\n{self.log()}")
            if " ready." in self.log():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"the worker was not ready after {timeout_s:g} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60) -> None:
        """Warm shutdown: running tasks finish, unstarted messages go back to the queue."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
