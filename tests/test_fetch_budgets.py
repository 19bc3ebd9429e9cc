"""What one party's fetches may hold: slots per submitter (worker) and per caller (API),
whatever hosts they name, and the worker's byte budget for fetched bodies
(`images.body_budget`), against real HTTP servers and real threads."""

from __future__ import annotations

import getpass
import threading
import time
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from moderation.auth.models import Role
from moderation.images.body_budget import BodyBudget
from moderation.images.fetch import fetch
from moderation.images.fetch_slots import FetchesBusy, FetchSlots
from moderation.images.uri_policy import UriPolicy
from moderation.runtime import Runtime
from moderation.screening import service
from moderation.screening.cli import submit_uris
from moderation.screening.models import Upload
from moderation.worker.intake.fetches import FetchGate, WorkerFetches
from moderation.worker.intake.jobs import IntakeStalled
from tests.api_fixtures import api, bearer, keys  # noqa: F401
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS
from tests.images import encode, textured, write
from tests.servers import http_server, image_handler

BODY = b"x" * 300_000


class _Refused(Exception):
    pass


def _refused(nbytes: int, waited_s: float) -> _Refused:
    return _Refused(f"{nbytes} bytes, waited {waited_s:.2f} s")


# Slots per party.


def test_the_worker_limits_one_submitter_whatever_hosts_its_uris_name() -> None:
    gate = FetchGate(total=10, per_host=5, per_submitter=2)
    with gate.held("a.example", 1, "key:1:spammer"), gate.held("b.example", 1, "key:1:spammer"):
        assert gate.in_flight_for("key:1:spammer") == 2
        # A third host does not help this submitter: it waits for its own slots, then gives
        # up (retried later) ...
        with (
            pytest.raises(IntakeStalled, match=r"key:1:spammer.*PER_SUBMITTER"),
            gate.held("c.example", 0.05, "key:1:spammer"),
        ):
            pass
        # ... while another submitter's fetch to the same hosts goes through at once.
        with gate.held("a.example", 0.01, "key:2:shop"):
            assert gate.in_flight == 3
    assert gate.in_flight == 0


def test_a_waiting_submitter_is_let_in_when_one_of_its_fetches_ends() -> None:
    gate = FetchGate(total=10, per_host=5, per_submitter=1)
    let_in = threading.Event()
    with gate.held("a.example", 1, "cli:op"):

        def wait() -> None:
            with gate.held("b.example", 10, "cli:op"):
                let_in.set()

        waiter = threading.Thread(target=wait)
        waiter.start()
        assert not let_in.wait(0.2)
    assert let_in.wait(10)
    waiter.join()


def test_the_api_refuses_a_callers_fetch_past_its_own_slots_at_once() -> None:
    slots = FetchSlots(total=10, per_host=5, per_party=1)
    with slots.taken("http://a.example/1.jpg", setting="MODERATION_API_FETCHES", party="r1"):
        with (
            pytest.raises(FetchesBusy, match="MODERATION_API_FETCHES_PER_CALLER"),
            slots.taken("http://b.example/2.jpg", setting="MODERATION_API_FETCHES", party="r1"),
        ):
            pass
        with slots.taken("http://b.example/2.jpg", setting="MODERATION_API_FETCHES", party="r2"):
            assert slots.in_flight == 2


# The byte budget.


def test_a_body_budget_waits_for_room_and_gives_up_at_its_deadline() -> None:
    budget = BodyBudget(1000)
    with budget.reservation(_refused) as first:
        first.grow_to(600, 1)
        first.grow_to(500, 1)  # never shrinks while held
        assert budget.used_bytes == 600
        with budget.reservation(_refused) as second:
            second.grow_to(400, 0.01)  # fits beside the first
            with pytest.raises(_Refused, match="401 bytes"):
                second.grow_to(401, 0.05)
            assert budget.used_bytes == 1000
    assert budget.used_bytes == 0
    assert budget.most_used_bytes == 1000


def test_a_release_lets_a_waiting_body_in() -> None:
    budget = BodyBudget(1000)
    holder = budget.reservation(_refused)
    holder.grow_to(900, 1)
    grown = threading.Event()

    def wait() -> None:
        with budget.reservation(_refused) as waiting:
            waiting.grow_to(500, 10)
            grown.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert not grown.wait(0.2)
    holder.release()
    assert grown.wait(10)
    waiter.join()


def test_a_body_larger_than_the_budget_goes_through_alone() -> None:
    budget = BodyBudget(1000)
    with budget.reservation(_refused) as alone:
        alone.grow_to(5000, 0.01)
        with budget.reservation(_refused) as other, pytest.raises(_Refused):
            other.grow_to(1, 0.05)


class _Chunked(BaseHTTPRequestHandler):
    """A body of unknown length, in chunks: the fetch learns its size as it streams."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(BODY), 100_000):
            chunk = BODY[start : start + 100_000]
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *_: object) -> None:
        pass


def _fetch(url: str, reserve: object) -> bytes:
    settings = TEST_SETTINGS
    return fetch(
        url,
        policy=UriPolicy.from_settings(settings),
        max_bytes=settings.max_bytes,
        timeout_s=5,
        reserve=reserve,  # type: ignore[arg-type]
    )


def test_a_declared_length_is_reserved_whole_before_the_body_is_read() -> None:
    asked: list[int] = []
    with http_server(image_handler(BODY)) as server:
        assert _fetch(f"{server}/a", lambda n, _: asked.append(n)) == BODY
    assert asked[0] == len(BODY)
    assert max(asked) == len(BODY)


def test_a_body_of_unknown_length_is_reserved_as_it_streams() -> None:
    asked: list[int] = []
    with http_server(_Chunked) as server:
        assert _fetch(f"{server}/a", lambda n, _: asked.append(n)) == BODY
    assert asked == sorted(asked)
    assert len(asked) > 1
    assert asked[-1] == len(BODY)


def test_a_refused_reservation_ends_the_fetch() -> None:
    def no_room(nbytes: int, wait_s: float) -> None:
        raise _Refused(f"{nbytes} bytes")

    with http_server(image_handler(BODY)) as server, pytest.raises(_Refused):
        _fetch(f"{server}/a", no_room)


@pytest.fixture
def tight_budget_fetches() -> WorkerFetches:
    # Room for two of the 300 kB bodies, not three.
    settings = TEST_SETTINGS.model_copy(
        update={"worker_fetch_memory_mb": 1, "fetch_timeout_s": 1.0, "worker_fetches": 16}
    )
    fetches = WorkerFetches(settings)
    fetches.bodies = BodyBudget(700_000)
    return fetches


def test_the_worker_holds_fetched_bodies_within_its_budget_until_screened(
    tight_budget_fetches: WorkerFetches,
) -> None:
    """Six uploads fetched at once, each holding its body for a while as if screened: no
    more than two bodies are ever held, and every upload gets its bytes."""
    fetches = tight_budget_fetches
    got: list[bytes | None] = []
    with http_server(image_handler(BODY)) as server:

        def screen_one(i: int) -> None:
            with fetches.fetched(f"{server}/{i}.jpg", f"key:{i}:s") as data:
                time.sleep(0.1)
                got.append(data)

        threads = [threading.Thread(target=screen_one, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert got == [BODY] * 6
    assert fetches.bodies.most_used_bytes == 2 * len(BODY)
    assert fetches.bodies.used_bytes == 0


def test_a_fetch_with_no_room_before_its_deadline_is_stalled_and_retried(
    tight_budget_fetches: WorkerFetches,
) -> None:
    fetches = tight_budget_fetches
    with http_server(image_handler(BODY)) as server, ExitStack() as held:
        held.enter_context(fetches.fetched(f"{server}/1.jpg"))
        held.enter_context(fetches.fetched(f"{server}/2.jpg"))
        with (
            pytest.raises(IntakeStalled, match="WORKER_FETCH_MEMORY_MB"),
            fetches.fetched(f"{server}/3.jpg"),
        ):
            pass
        # What the failed fetch had reserved is back: only the two held bodies count.
        assert fetches.bodies.used_bytes == 2 * len(BODY)
        assert fetches.gate is not None
        assert fetches.gate.in_flight == 0


# Who submitted.


def test_an_upload_records_its_submitter(
    api: TestClient,  # noqa: F811
    keys: dict[Role, str],  # noqa: F811
    tmp_path: Path,
    runtime: Runtime,
) -> None:
    image = write(tmp_path / "a.jpg", encode(textured(64)))
    response = api.post(
        "/v1/uploads", json={"uri": image.as_uri()}, headers=bearer(keys[Role.SUBMITTER])
    )
    assert response.status_code == 202, response.text
    (by_cli,) = submit_uris(runtime, [(tmp_path / "a.jpg").as_uri()])
    with TEST_RUNTIME.session() as session:
        by_key = session.get_one(Upload, response.json()["upload_id"])
        assert by_key.submitted_by is not None
        assert by_key.submitted_by.startswith("key:")
        assert by_key.submitted_by.endswith(f":test {Role.SUBMITTER}")
        assert session.get_one(Upload, by_cli).submitted_by == f"cli:{getpass.getuser()}"
        # And the worker's claim carries it to the fetch.
        claim = service.claim(session, by_key.id, max_attempts=3)
        assert claim is not None
        assert claim.submitted_by == by_key.submitted_by
