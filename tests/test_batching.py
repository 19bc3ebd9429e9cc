"""The dynamic batcher: many threads' requests, one call per batch."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from moderation.embedding.clip import ClipEmbedder
from moderation.worker.batching import Batcher, BatchTimeout, Chain
from tests.images import textured


def _wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _in_threads(count: int, target: Callable[[int], object]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_concurrent_images_share_forward_passes(tiny_model: Path) -> None:
    embedder = ClipEmbedder(str(tiny_model), "cpu")
    batch_sizes: list[int] = []

    def embed(pixels: list[np.ndarray]) -> list[np.ndarray]:
        batch_sizes.append(len(pixels))
        if len(batch_sizes) == 1:
            # The first forward pass lasts until every other image waits for one.
            _wait_until(lambda: batcher.waiting == 17 - len(pixels))
        return list(embedder.embed(np.stack(pixels)))

    batcher = Batcher(embed, name="embedding", max_batch=8, max_wait_s=0.05)
    images = [embedder.preprocess(textured(seed, (100, 80))) for seed in range(17)]
    results: dict[int, np.ndarray] = {}

    def one(i: int) -> None:
        (results[i],) = batcher.submit([images[i]])

    _in_threads(17, one)
    batcher.close()
    assert sum(batch_sizes) == 17
    # The first pass, then those that waited for it, in full batches of 8 but the last.
    first, *rest = batch_sizes
    assert len(rest) == math.ceil((17 - first) / 8)
    assert all(size == 8 for size in rest[:-1])
    assert batcher.stats.mean_batch == 17 / len(batch_sizes)
    # Every caller got its own image's embedding back.
    expected = embedder.embed(np.stack(images))
    for i in range(17):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-5)


def test_several_streams_run_at_once() -> None:
    active, peak, calls = 0, 0, 0
    lock = threading.Lock()
    # The first two batches each wait for the other: they can only both pass at once.
    together = threading.Barrier(2, timeout=30)

    def slow_double(items: list[int]) -> list[int]:
        nonlocal active, peak, calls
        with lock:
            active += 1
            peak = max(peak, active)
            calls += 1
            first_two = calls <= 2
        if first_two:
            together.wait()
        with lock:
            active -= 1
        return [2 * item for item in items]

    batcher = Batcher(slow_double, name="slow", max_batch=2, max_wait_s=0.01, streams=2)
    results: dict[int, int] = {}

    def one(i: int) -> None:
        (results[i],) = batcher.submit([i])

    _in_threads(4, one)
    batcher.close()
    assert peak == 2
    assert results == {0: 0, 1: 2, 2: 4, 3: 6}
    assert batcher.stats.items == 4


def test_without_a_wait_a_lone_request_runs_at_once_and_a_queue_runs_together() -> None:
    batch_sizes: list[int] = []
    release = threading.Event()

    def record(items: list[int]) -> list[int]:
        batch_sizes.append(len(items))
        release.wait(timeout=10)
        return items

    batcher = Batcher(record, name="no-wait", max_batch=64)
    started = time.monotonic()
    first = threading.Thread(target=batcher.submit, args=([0],))
    first.start()
    while not batch_sizes:
        assert time.monotonic() - started < 10
        time.sleep(0.01)
    others = [threading.Thread(target=batcher.submit, args=([i],)) for i in range(1, 6)]
    for thread in others:
        thread.start()
    while batcher.waiting < 5:
        assert time.monotonic() - started < 10
        time.sleep(0.01)
    release.set()
    for thread in [first, *others]:
        thread.join()
    batcher.close()
    assert batch_sizes == [1, 5]


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(lambda items: 1 / 0, id="raises"),
        pytest.param(lambda items: items[:-1], id="miscounts"),
    ],
)
def test_every_request_of_a_failed_batch_fails(run: Callable[[list[int]], Sequence[int]]) -> None:
    batcher = Batcher(run, name="broken", max_batch=4, max_wait_s=0.01)
    with pytest.raises((ZeroDivisionError, RuntimeError)):
        batcher.submit([1, 2, 3])
    # The stream survives a failed batch.
    with pytest.raises((ZeroDivisionError, RuntimeError)):
        batcher.submit([4])
    batcher.close()
    with pytest.raises(RuntimeError, match="broken has stopped"):
        batcher.submit([5])


def test_every_caller_sharing_a_failed_batch_is_told() -> None:
    """Each thread is a caller of its own; a batcher that told only the first caller of a
    failed batch would leave the others to time out here instead."""
    batch_sizes: list[int] = []

    def fail(items: list[int]) -> list[int]:
        batch_sizes.append(len(items))
        raise ZeroDivisionError("the model failed")

    batcher = Batcher(fail, name="broken", max_batch=8, max_wait_s=0.5)
    outcomes: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            batcher.submit([i], timeout_s=5)
        except (ZeroDivisionError, BatchTimeout) as error:
            outcomes[i] = type(error).__name__

    _in_threads(4, one)
    batcher.close()
    assert batch_sizes == [4]  # one batch, four callers
    assert outcomes == dict.fromkeys(range(4), "ZeroDivisionError")


def test_a_caller_waits_no_longer_than_its_timeout() -> None:
    release = threading.Event()

    def stall(items: list[int]) -> list[int]:
        release.wait(timeout=10)
        return items

    batcher = Batcher(stall, name="stalled", max_batch=1)
    started = time.monotonic()
    with pytest.raises(BatchTimeout, match=r"stalled: no result within 0\.3 s"):
        batcher.submit([1], timeout_s=0.3)
    assert time.monotonic() - started < 2
    release.set()
    batcher.close()


def test_a_chain_runs_each_batch_through_both_stages_and_hands_it_on_whole() -> None:
    """A forward pass's results go on to the second stage together, as one batch, and each
    caller gets what the second stage made of its own item; a caller of the first stage
    alone would get the first stage's result instead."""
    second_batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    def describe(items: list[int]) -> list[str]:
        second_batches.append(items)
        return [f"<{i}>" for i in items]

    gate = threading.Event()
    first_started = threading.Event()

    def gated_double(items: list[int]) -> list[int]:
        first_started.set()
        gate.wait(timeout=10)
        return double(items)

    first = Batcher(gated_double, name="first", max_batch=8, max_wait_s=0.0)
    second = Batcher(describe, name="second", max_batch=8, max_wait_s=0.0)
    chain = Chain(first, second)
    results: dict[int, list[str]] = {}

    def one(i: int) -> None:
        results[i] = chain.submit([i], timeout_s=5)

    blocker = threading.Thread(target=one, args=(100,))
    blocker.start()
    assert first_started.wait(timeout=5)  # the others queue up behind this batch
    waiting = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 5
    while first.waiting < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for thread in [blocker, *waiting]:
        thread.join()
    first.close()
    second.close()
    assert results == {i: [f"<{2 * i}>"] for i in [100, 0, 1, 2, 3]}
    # The first stage's second batch (four items) reached the second stage whole.
    assert any({0, 2, 4, 6} <= set(batch) for batch in second_batches), second_batches


@pytest.mark.parametrize("failing", ["first", "second"])
def test_a_failure_in_either_stage_of_a_chain_reaches_every_caller(failing: str) -> None:
    def fail(items: list[int]) -> list[int]:
        raise ZeroDivisionError(f"{failing} failed")

    def same(items: list[int]) -> list[int]:
        return items

    first = Batcher(fail if failing == "first" else same, name="first", max_batch=8)
    second = Batcher(fail if failing == "second" else same, name="second", max_batch=8)
    chain = Chain(first, second)
    with pytest.raises(ZeroDivisionError, match=f"{failing} failed"):
        chain.submit([1, 2, 3], timeout_s=5)
    first.close()
    second.close()


def test_a_chain_caller_waits_no_longer_than_its_timeout_when_the_second_stage_stalls() -> None:
    release = threading.Event()

    def stall(items: list[int]) -> list[int]:
        release.wait(timeout=10)
        return items

    first: Batcher[int, int] = Batcher(lambda items: items, name="first", max_batch=1)
    second = Batcher(stall, name="second", max_batch=1)
    chain = Chain(first, second)
    started = time.monotonic()
    with pytest.raises(BatchTimeout, match=r"no result within 0\.3 s"):
        chain.submit([1], timeout_s=0.3)
    assert time.monotonic() - started < 2
    release.set()
    first.close()
    second.close()
