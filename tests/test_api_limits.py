"""An API process's own limits on what untrusted content can make large or slow: decodes
share one memory budget with a cap on how many run at once, and fetches are refused at
once past a limit per process and per host, so slow servers never take every thread."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import delete, update

from moderation.auth.models import Role
from moderation.http.limits import ApiLimits
from moderation.images.budget import DecodeGate
from moderation.images.fetch_slots import FetchesBusy, FetchSlots
from moderation.images.signals import SignalType
from moderation.main.app import create_app
from moderation.review.models import Hit
from moderation.runtime import Runtime
from moderation.screening.models import Signal, Upload
from tests.api_fixtures import bearer, keys
from tests.conftest import TEST_RUNTIME
from tests.servers import http_server
from tests.web_fixtures import BASE_URL, seed_hit

__all__ = ["keys"]


@pytest.fixture
def limited(make_runtime: Callable[..., Runtime]) -> Runtime:
    """A runtime with small limits: 150 MiB of decodes, two at once; eight fetches, two to
    a host (local files count as one host)."""
    return make_runtime(
        api_decode_memory_mb=150, api_decodes=2, api_fetches=8, api_fetches_per_host=2
    )


@pytest.fixture
def app(clean_db: None, limited: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(limited), base_url=BASE_URL, follow_redirects=False) as client:
        yield client


@pytest.fixture
def decoding_app(clean_db: None, make_runtime: Callable[..., Runtime]) -> Iterator[TestClient]:
    """150 MiB of decodes, two at once, and fetch slots for every request the decode test
    makes at once: its six local files are one host, and a fetch refused as busy would
    answer 503 before ever reaching the decode gate it measures."""
    runtime = make_runtime(
        api_decode_memory_mb=150,
        api_decodes=2,
        api_fetches=8,
        api_fetches_per_host=8,
        api_fetches_per_caller=8,
    )
    with TestClient(create_app(runtime), base_url=BASE_URL, follow_redirects=False) as client:
        yield client


def _limits(app: TestClient) -> ApiLimits:
    """The application's limits, which every route that decodes or fetches shares."""
    limits: ApiLimits = app.app.state.api_limits  # type: ignore[attr-defined]
    return limits


def _hitless_upload(directory: Path, uri: str, served: bytes) -> int:
    """A screened upload with no hit and no evidence (an analyst's search result), whose
    screened SHA-256 is that of `served`: its thumbnail is fetched from `uri`."""
    seeded = seed_hit(directory, bank_name=f"bank-{directory.name}")
    with TEST_RUNTIME.session() as session:
        session.execute(delete(Hit).where(Hit.upload_id == seeded.upload_id))
        session.execute(update(Upload).where(Upload.id == seeded.upload_id).values(uri=uri))
        session.execute(
            update(Signal)
            .where(Signal.upload_id == seeded.upload_id, Signal.signal == SignalType.SHA256)
            .values(value=hashlib.sha256(served).digest())
        )
    return seeded.upload_id


def test_thumbnails_decode_within_one_budget_and_at_most_so_many_at_once(
    decoding_app: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    app = decoding_app
    # 12 megapixels of PNG: about 144 MB at the decoder's estimated peak, so the 150 MiB
    # budget admits one decode at a time, whatever the number of requests.
    picture = tmp_path / "large.png"
    Image.new("RGB", (4000, 3000), (90, 140, 200)).save(picture)
    served = picture.read_bytes()
    uploads = [_hitless_upload(tmp_path / f"u{i}", picture.as_uri(), served) for i in range(6)]
    reviewer = bearer(keys[Role.REVIEWER])

    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda upload_id: app.get(
                    f"/review/uploads/{upload_id}/thumbnail", headers=reviewer
                ),
                uploads,
            )
        )

    assert [answer.status_code for answer in answers] == [200] * 6
    gate = _limits(app).decodes
    budget = 150 * 2**20
    # Every decode went through the gate: a large one reserved its share...
    assert gate.memory.most_used_bytes > 100 * 2**20
    # ...and never more than the budget, nor more decodes than allowed, were held at once.
    assert gate.memory.most_used_bytes <= budget
    assert 1 <= gate.most_decoding <= 2


def _held_image_handler(
    image: bytes, release: threading.Event, arrived: threading.Semaphore
) -> type[BaseHTTPRequestHandler]:
    """Serves `image` once `release` is set; each request signals `arrived` first."""

    class HeldImage(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            arrived.release()
            release.wait(30)
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *_: object) -> None:
            pass

    return HeldImage


def test_a_slow_host_gets_its_own_fetch_slots_and_the_rest_is_answered_at_once(
    app: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    picture = tmp_path / "small.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(picture)
    served = picture.read_bytes()
    release = threading.Event()
    arrived = threading.Semaphore(0)
    reviewer = bearer(keys[Role.REVIEWER])
    with http_server(_held_image_handler(served, release, arrived)) as base:
        uploads = [_hitless_upload(tmp_path / f"s{i}", f"{base}/{i}.png", served) for i in range(3)]
        with ThreadPoolExecutor(2) as pool:
            held = [
                pool.submit(app.get, f"/review/uploads/{upload_id}/thumbnail", headers=reviewer)
                for upload_id in uploads[:2]
            ]
            # Both fetches reached the slow server and are held there.
            assert arrived.acquire(timeout=30)
            assert arrived.acquire(timeout=30)
            assert _limits(app).fetches.in_flight == 2

            # A third to the same host is refused at once, saying why; other requests are
            # served meanwhile.
            third = app.get(f"/review/uploads/{uploads[2]}/thumbnail", headers=reviewer)
            assert third.status_code == 503
            assert "MODERATION_API_FETCHES_PER_HOST" in third.text
            assert app.get("/healthz").status_code == 200

            release.set()
            assert [answer.result(30).status_code for answer in held] == [200, 200]
        assert _limits(app).fetches.in_flight == 0
        # Its slot free again, the third is served.
        again = app.get(f"/review/uploads/{uploads[2]}/thumbnail", headers=reviewer)
        assert again.status_code == 200


def test_fetch_slots_count_per_process_and_per_host() -> None:
    slots = FetchSlots(total=3, per_host=2)
    with (
        slots.taken("http://a.example/1", setting="S"),
        slots.taken("http://A.example/2", setting="S"),
    ):
        with pytest.raises(FetchesBusy, match=r"2 fetches from a\.example"):
            slots.taken("http://a.example/3", setting="S").__enter__()
        with slots.taken("http://b.example/1", setting="S"):
            with pytest.raises(FetchesBusy, match="3 fetches are in flight"):
                slots.taken("http://c.example/1", setting="S").__enter__()
            assert slots.in_flight == 3
    assert slots.in_flight == 0
    with slots.taken("http://a.example/4", setting="S"):  # released, so taken again
        assert slots.in_flight == 1


def test_the_decode_gate_holds_the_cap_on_decodes_at_once() -> None:
    gate = DecodeGate(total_bytes=10**9, max_decodes=2)
    inside = threading.Barrier(2, timeout=10)
    leave = threading.Event()
    third_entered = threading.Event()

    def decode(signal_entry: bool) -> None:
        with gate.reserve(1):
            if signal_entry:
                third_entered.set()
                return
            inside.wait()
            leave.wait(10)

    workers = [threading.Thread(target=decode, args=(False,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    third = threading.Thread(target=decode, args=(True,))
    while gate.decoding < 2:
        threading.Event().wait(0.01)
    third.start()
    # The third waits for a slot: it has not entered while both are held.
    assert not third_entered.wait(0.3)
    leave.set()
    assert third_entered.wait(10)
    for thread in (*workers, third):
        thread.join(10)
    assert gate.most_decoding == 2
