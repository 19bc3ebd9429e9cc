"""How many fetches a process makes at once, in all and to one host.

A fetch waits on the network, up to its deadline; where fetches run on threads that other
work needs too (an API process's thread pool), slow or hostile servers must not take all
of them. A fetch past either limit is refused at once, so the caller can answer "busy,
try again" instead of queueing behind the slow ones.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from moderation.errors import Unavailable


class FetchesBusy(Unavailable):
    code = "fetches_busy"


class FetchSlots:
    def __init__(self, total: int, per_host: int) -> None:
        if total < 1 or per_host < 1:
            raise ValueError("at least one fetch must be allowed")
        self.total = total
        self.per_host = per_host
        self._lock = threading.Lock()
        self._in_flight = 0
        self._by_host: Counter[str] = Counter()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def taken(self, uri: str, *, setting: str) -> Iterator[None]:
        """Hold one slot for a fetch of `uri` while the block runs; raises `FetchesBusy`
        when every slot, or every slot for its host, is taken. `setting`: the prefix of
        the settings that size these slots, named in the refusal."""
        host = (urlsplit(uri).hostname or "").lower()  # "" for local files
        with self._lock:
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
            self._in_flight += 1
            self._by_host[host] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._by_host[host] -= 1
                if not self._by_host[host]:
                    del self._by_host[host]
