"""Fixtures for the web pages' tests: a client that speaks HTTPS (so the Secure session
cookie is sent back, as a browser would), logging in, and a hit over a real image file."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from moderation.banks.models import Bank, BankEntry
from moderation.images.signals import SignalType
from moderation.main.app import create_app
from moderation.review.models import Hit
from moderation.runtime import Runtime
from moderation.screening.models import Signal, Upload, UploadStatus
from moderation.web.service import COOKIE_NAME
from tests.conftest import TEST_RUNTIME

BASE_URL = "https://testserver"
# What a browser sends with a form posted from this site's own pages.
SAME_ORIGIN = {"Origin": BASE_URL}


def browser(runtime: Runtime) -> TestClient:
    """The application on `runtime` over HTTPS, not following redirects (the tests look at
    them)."""
    return TestClient(create_app(runtime), base_url=BASE_URL, follow_redirects=False)


@pytest.fixture
def site(clean_db: None, runtime: Runtime) -> Iterator[TestClient]:
    """The application on the tests' runtime, in a browser (`browser`)."""
    with browser(runtime) as client:
        yield client


def log_in(client: TestClient, key: str) -> str:
    """Log in through the form; the session token the client now holds."""
    response = client.post("/login", data={"api_key": key}, headers=SAME_ORIGIN)
    assert response.status_code == 303, response.text
    token = client.cookies.get(COOKIE_NAME)
    assert token
    return token


def detailed_image(path: Path, size: tuple[int, int] = (480, 360), seed: int = 1) -> Path:
    """A JPEG full of fine detail, which blurring must remove."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)
    image.save(path, format="JPEG", quality=92)
    return path


@dataclass(frozen=True)
class Seeded:
    upload_id: int
    hit_id: int
    bank_id: int
    entry_id: int
    image: Path
    # Where the bank entry's source is said to be, and what it holds: no page may show either.
    source_ref: str
    source_bytes: bytes


def seed_hit(directory: Path, *, bank_name: str = "known-bad", seed: int = 1) -> Seeded:
    """A screened upload of a real image file with a PDQ hit on a bank entry, committed."""
    directory.mkdir(parents=True, exist_ok=True)
    image = detailed_image(directory / "upload.jpg", seed=seed)
    source = directory / "restricted-source.bin"
    source_bytes = b"RESTRICTED-BANK-SOURCE-" + hashlib.sha256(str(directory).encode()).digest()
    source.write_bytes(source_bytes)
    data = image.read_bytes()
    with TEST_RUNTIME.session() as session:
        bank = Bank(name=bank_name)
        session.add(bank)
        session.flush()
        entry = BankEntry(
            bank_id=bank.id,
            sha256=hashlib.sha256(b"other").digest(),
            pdq=bytes(range(32)),
            pdq_quality=90,
            source_ref=source.as_uri(),
            added_by="test",
        )
        upload = Upload(
            uri=image.as_uri(),
            status=UploadStatus.SCREENED,
            media_format="JPEG",
            width=480,
            height=360,
            frame_count=1,
            frames_hashed=1,
        )
        session.add_all([entry, upload])
        session.flush()
        session.add_all(
            [
                Signal(
                    upload_id=upload.id,
                    signal=SignalType.SHA256,
                    value=hashlib.sha256(data).digest(),
                ),
                Signal(
                    upload_id=upload.id,
                    signal=SignalType.PDQ,
                    value=bytes(range(1, 33)),
                    quality=88,
                ),
            ]
        )
        hit = Hit(upload_id=upload.id, bank_entry_id=entry.id, signal=SignalType.PDQ, distance=7)
        session.add(hit)
        session.flush()
        return Seeded(
            upload_id=upload.id,
            hit_id=hit.id,
            bank_id=bank.id,
            entry_id=entry.id,
            image=image,
            source_ref=source.as_uri(),
            source_bytes=source_bytes,
        )


def add_hit(upload_id: int, *, bank_name: str, signal: SignalType = SignalType.SHA256) -> int:
    """Another hit of an upload, on an entry of a new bank (as a retro-hunt adds one): its id."""
    with TEST_RUNTIME.session() as session:
        bank = Bank(name=bank_name)
        session.add(bank)
        session.flush()
        entry = BankEntry(
            bank_id=bank.id, sha256=hashlib.sha256(bank_name.encode()).digest(), added_by="test"
        )
        session.add(entry)
        session.flush()
        hit = Hit(upload_id=upload_id, bank_entry_id=entry.id, signal=signal, distance=0)
        session.add(hit)
        session.flush()
        return hit.id
