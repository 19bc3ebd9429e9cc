"""The decode memory budget: never over, first come first served, and decode honours it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from PIL import Image

from moderation.config import Settings
from moderation.images import memory
from moderation.images.budget import PEAK_BYTES_PER_PIXEL, MemoryBudget
from moderation.images.decode import DecodeLimits, decode
from tests.images import encode, textured

LIMITS = DecodeLimits.from_settings(Settings())


class Overlap:
    """Counts how many threads are inside `hold` at once."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()

    def hold(self, seconds: float = 0.1) -> None:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(seconds)
        with self._lock:
            self.active -= 1


def _in_threads(count: int, target: Callable[[int], object]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
        time.sleep(0.01)  # in order of arrival
    for thread in threads:
        thread.join()


def test_reservations_never_exceed_the_budget() -> None:
    budget = MemoryBudget(100)
    overlap = Overlap()
    seen: list[int] = []

    def reserve(_: int) -> None:
        with budget.reserve(40):
            seen.append(budget.used_bytes)
            overlap.hold()

    _in_threads(6, reserve)
    assert overlap.peak == 2  # two of 40 fit in 100, a third does not
    assert max(seen) <= 100
    assert budget.used_bytes == 0


def test_requests_are_served_in_arrival_order() -> None:
    """A large request is not starved by small ones that arrive after it."""
    budget = MemoryBudget(100)
    order: list[str] = []
    first_holds = threading.Event()

    def run(name: str, nbytes: int) -> None:
        with budget.reserve(nbytes):
            order.append(name)
            if name == "first":
                first_holds.set()
            time.sleep(0.1)

    first = threading.Thread(target=run, args=("first", 60))
    first.start()
    assert first_holds.wait(timeout=10)
    large = threading.Thread(target=run, args=("large", 90))
    large.start()
    time.sleep(0.02)
    small = threading.Thread(target=run, args=("small", 10))  # would fit now, but waits
    small.start()
    for thread in (first, large, small):
        thread.join()
    assert order == ["first", "large", "small"]


def test_a_request_larger_than_the_budget_runs_alone() -> None:
    budget = MemoryBudget(100)
    with budget.reserve(1_000):
        assert budget.used_bytes == 100
    assert budget.used_bytes == 0


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        MemoryBudget(0)


@pytest.mark.parametrize(("images_fitting", "expected_peak"), [(1, 1), (3, 3)])
def test_decodes_hold_frames_only_within_the_budget(
    images_fitting: int, expected_peak: int
) -> None:
    size = (640, 480)
    data = encode(textured(1, size))
    budget = MemoryBudget(images_fitting * size[0] * size[1] * PEAK_BYTES_PER_PIXEL)
    overlap = Overlap()

    def visit(frame: Image.Image, sampled: bool) -> None:
        overlap.hold()

    def decode_one(_: int) -> None:
        decode(data, LIMITS, visit, budget=budget)

    _in_threads(4, decode_one)
    assert overlap.peak == expected_peak


def test_a_large_reservation_hands_freed_memory_back_when_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    released: list[int] = []

    def release() -> bool:
        released.append(1)
        return True

    monkeypatch.setattr("moderation.images.budget.release_free_memory", release)
    budget = MemoryBudget(2**40, release_after_bytes=100)
    with budget.reserve(99):
        pass
    assert released == []
    with budget.reserve(100):
        assert released == []  # not while it is held
    assert released == [1]


def test_the_allocator_is_configured_and_trimmed_on_glibc() -> None:
    # This project's machines run glibc; elsewhere both report that they did nothing.
    assert memory.configure_allocator()
    memory.release_free_memory()  # returns whether anything was free to give back
