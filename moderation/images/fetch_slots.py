"""How many fetches a process makes at once, in all and to one host.

A fetch waits on the network, up to its deadline, so fetches are counted apart from the
CPU's work: slow or hostile servers must hold only slots of their own. An API process,
whose threads every other request needs too, refuses a fetch past either limit at once
(`taken`: the caller answers "busy, try again"); the worker, whose upload has nowhere
better to wait, waits for a slot, up to a limit (`held`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from moderation.errors import Unavailable


class FetchesBusy(Unavailable):
    code = "fetches_busy"


def host_of(uri: str) -> str:
    """The host a fetch of `uri` counts against ("" for local files)."""
    return (urlsplit(uri).hostname or "").lower()


class FetchSlots:
    def __init__(self, total: int, per_host: int) -> None:
        if total < 1 or per_host < 1:
            raise ValueError("at least one fetch must be allowed")
        self.total = total
        self.per_host = per_host
        self._free = threading.Condition()
        self._in_flight = 0
        self._by_host: Counter[str] = Counter()

    @property
    def in_flight(self) -> int:
        with self._free:
            return self._in_flight

    def in_flight_to(self, host: str) -> int:
        with self._free:
            return self._by_host[host]

    @contextmanager
    def taken(self, uri: str, *, setting: str) -> Iterator[None]:
        """Hold one slot for a fetch of `uri` while the block runs; raises `FetchesBusy`
        at once when every slot, or every slot for its host, is taken. `setting`: the
        prefix of the settings that size these slots, named in the refusal."""
        host = host_of(uri)
        with self._free:
            if self._in_flight >= self.total:
                raise FetchesBusy(
                    f"{self.total} fetches are in flight in this process ({setting}); "
                    "try again shortly"
                )
            if self._by_host[host] >= self.per_host:
                raise FetchesBusy(
                    f"{self.per_host} fetches from {host or 'local files'} are in flight in "
                    f"this process ({setting}_PER_HOST); try again shortly"
                )
            self._take(host)
        try:
            yield
        finally:
            self._give_back(host)

    @contextmanager
    def held(
        self, host: str, timeout_s: float, timed_out: Callable[[bool], Exception]
    ) -> Iterator[None]:
        """A slot in all and one for `host` while the block runs, waiting for them up to
        `timeout_s`; then raises `timed_out(host_full)`, host_full saying whether the
        host's slots were the ones taken."""
        deadline = time.monotonic() + timeout_s
        with self._free:
            while self._in_flight >= self.total or self._by_host[host] >= self.per_host:
                left = deadline - time.monotonic()
                if left <= 0 or not self._free.wait(left):
                    raise timed_out(self._by_host[host] >= self.per_host)
            self._take(host)
        try:
            yield
        finally:
            self._give_back(host)

    def _take(self, host: str) -> None:
        self._in_flight += 1
        self._by_host[host] += 1

    def _give_back(self, host: str) -> None:
        with self._free:
            self._in_flight -= 1
            self._by_host[host] -= 1
            if not self._by_host[host]:
                del self._by_host[host]
            # Waiters for other hosts may be free to go as well as one for this host.
            self._free.notify_all()
