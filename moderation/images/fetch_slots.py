"""How many fetches a process makes at once: in all, to one host, and for one party (the
submitter of an upload in the worker, the caller in the API).

A fetch waits on the network, up to its deadline, so fetches are counted apart from the
CPU's work: slow or hostile servers must hold only slots of their own, and so must one
submitter's (or caller's) URIs, whatever hosts they name. An API process,
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
from typing import Literal
from urllib.parse import urlsplit

from moderation.errors import Unavailable

# Whose slots a waiting fetch found taken.
Full = Literal["all", "host", "party"]


class FetchesBusy(Unavailable):
    code = "fetches_busy"


def host_of(uri: str) -> str:
    """The host a fetch of `uri` counts against ("" for local files)."""
    return (urlsplit(uri).hostname or "").lower()


class FetchSlots:
    def __init__(self, total: int, per_host: int, per_party: int | None = None) -> None:
        """`per_party`: None, no limit per party beyond `total`."""
        if total < 1 or per_host < 1 or (per_party is not None and per_party < 1):
            raise ValueError("at least one fetch must be allowed")
        self.total = total
        self.per_host = per_host
        self.per_party = total if per_party is None else per_party
        self._free = threading.Condition()
        self._in_flight = 0
        self._by_host: Counter[str] = Counter()
        self._by_party: Counter[str] = Counter()

    @property
    def in_flight(self) -> int:
        with self._free:
            return self._in_flight

    def in_flight_to(self, host: str) -> int:
        with self._free:
            return self._by_host[host]

    def in_flight_for(self, party: str) -> int:
        with self._free:
            return self._by_party[party]

    @contextmanager
    def taken(self, uri: str, *, setting: str, party: str = "") -> Iterator[None]:
        """Hold one slot for a fetch of `uri` for `party` while the block runs; raises
        `FetchesBusy` at once when every slot, or every slot for its host or its party, is
        taken. `setting`: the prefix of the settings that size these slots, named in the
        refusal."""
        host = host_of(uri)
        with self._free:
            full = self._full(host, party)
            if full == "all":
                raise FetchesBusy(
                    f"{self.total} fetches are in flight in this process ({setting}); "
                    "try again shortly"
                )
            if full == "host":
                raise FetchesBusy(
                    f"{self.per_host} fetches from {host or 'local files'} are in flight in "
                    f"this process ({setting}_PER_HOST); try again shortly"
                )
            if full == "party":
                raise FetchesBusy(
                    f"{self.per_party} of your fetches are in flight in this process "
                    f"({setting}_PER_CALLER); try again shortly"
                )
            self._take(host, party)
        try:
            yield
        finally:
            self._give_back(host, party)

    @contextmanager
    def held(
        self,
        host: str,
        timeout_s: float,
        timed_out: Callable[[Full], Exception],
        party: str = "",
    ) -> Iterator[None]:
        """A slot in all, one for `host` and one for `party` while the block runs, waiting
        for them up to `timeout_s`; then raises `timed_out(full)`, `full` saying whose
        slots were the ones taken."""
        deadline = time.monotonic() + timeout_s
        with self._free:
            while (full := self._full(host, party)) is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._free.wait(left):
                    raise timed_out(full)
            self._take(host, party)
        try:
            yield
        finally:
            self._give_back(host, party)

    def _full(self, host: str, party: str) -> Full | None:
        if self._by_host[host] >= self.per_host:
            return "host"
        if self._in_flight >= self.total:
            return "all"
        if self._by_party[party] >= self.per_party:
            return "party"
        return None

    def _take(self, host: str, party: str) -> None:
        self._in_flight += 1
        self._by_host[host] += 1
        self._by_party[party] += 1

    def _give_back(self, host: str, party: str) -> None:
        with self._free:
            self._in_flight -= 1
            for counts, key in ((self._by_host, host), (self._by_party, party)):
                counts[key] -= 1
                if not counts[key]:
                    del counts[key]
            # Waiters for other hosts or parties may be free to go as well as this one's.
            self._free.notify_all()
