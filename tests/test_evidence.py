"""Evidence: sealed at rest, kept by the worker from the bytes it screened (the frame that
matched included), fetched again for later hits only if the bytes are the screened ones,
deleted after retention unless held, and every read audited."""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError
from sqlalchemy import select

from moderation.audit.models import AuditEvent
from moderation.banks import service as banks
from moderation.evidence import service as evidence
from moderation.evidence.models import Evidence, EvidenceSource, EvidenceState
from moderation.evidence.sealing import EvidenceTampered, Sealer, new_key, parse_key
from moderation.evidence.storage import DirectoryStore, S3Store, open_store
from moderation.evidence.tasks import CHORES as EVIDENCE_CHORES
from moderation.evidence.vault import Vault, frame_name
from moderation.images.hashing import pdq
from moderation.review import service as review
from moderation.review.models import Hit
from moderation.review.tasks import CHORES as REVIEW_CHORES
from moderation.screening.cli import submit_uris, wait_until_final
from moderation.screening.models import UploadStatus
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS
from tests.images import animated_gif, write
from tests.web_fixtures import seed_hit

(CAPTURE,) = REVIEW_CHORES
(PURGE,) = EVIDENCE_CHORES


def _vault() -> Vault:
    vault = Vault.from_settings(TEST_SETTINGS)
    assert vault is not None, "the tests configure an evidence key"
    return vault


def _is_image(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
    except (UnidentifiedImageError, OSError):
        return False
    return True


def _jpeg(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(out, format="JPEG")
    return out.getvalue()


def test_a_sealed_blob_is_no_image_and_opens_only_under_its_name_and_key() -> None:
    key, other = parse_key(new_key()), parse_key(new_key())
    sealer = Sealer(key)
    plain = _jpeg((200, 10, 10))
    sealed = sealer.seal("uploads/1/ab/frame-0.jpg", plain)
    assert _is_image(plain)
    assert not _is_image(sealed)
    assert plain[:3] not in sealed
    assert plain[100:140] not in sealed
    assert sealer.open("uploads/1/ab/frame-0.jpg", sealed) == plain
    with pytest.raises(EvidenceTampered, match="altered or misnamed"):
        sealer.open("uploads/2/ab/frame-0.jpg", sealed)  # moved onto another upload
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(EvidenceTampered):
        sealer.open("uploads/1/ab/frame-0.jpg", bytes(tampered))
    with pytest.raises(EvidenceTampered, match="not configured"):
        Sealer(other).open("uploads/1/ab/frame-0.jpg", sealed)
    # After a rotation the old key still opens what it sealed; new blobs use the new key.
    rotated = Sealer(other, [key])
    assert rotated.open("uploads/1/ab/frame-0.jpg", sealed) == plain
    with pytest.raises(EvidenceTampered, match="not configured"):
        sealer.open("n", rotated.seal("n", plain))


def test_the_directory_store_is_private_and_refuses_names_outside_it(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/vault")
    assert isinstance(store, DirectoryStore)
    store.put("uploads/1/x/frame-0.jpg", b"sealed")
    path = tmp_path / "vault/uploads/1/x/frame-0.jpg"
    assert path.read_bytes() == b"sealed"
    assert (path.stat().st_mode & 0o077, path.parent.stat().st_mode & 0o077) == (0, 0)
    assert store.get("uploads/1/x/frame-0.jpg") == b"sealed"
    assert store.get("uploads/1/x/frame-1.jpg") is None
    with pytest.raises(ValueError, match="leaves the store"):
        store.get("../outside")
    store.delete("uploads/1/x/frame-0.jpg")
    assert not (tmp_path / "vault/uploads").exists()


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3-compatible server on a free port of 127.0.0.1, with a bucket."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="evidence")
    yield endpoint
    server.stop()


def test_the_s3_store_keeps_sealed_objects_under_its_prefix(s3_endpoint: str) -> None:
    store = open_store("s3://evidence/moderation/prod", s3_endpoint_url=s3_endpoint)
    assert isinstance(store, S3Store)
    sealer = Sealer(parse_key(new_key()))
    name = "uploads/7/ab/frame-3.jpg"
    store.put(name, sealer.seal(name, _jpeg((0, 0, 200))))
    import boto3

    raw = (
        boto3.client("s3", endpoint_url=s3_endpoint)
        .get_object(Bucket="evidence", Key=f"moderation/prod/{name}")["Body"]
        .read()
    )
    assert not _is_image(raw)
    stored = store.get(name)
    assert stored is not None
    assert _is_image(sealer.open(name, stored))
    assert store.get("uploads/7/ab/frame-4.jpg") is None
    store.delete(name)
    assert store.get(name) is None


def _frames(count: int) -> list[Image.Image]:
    """Frames unlike each other in PDQ: random blocks, each its own seed and main colour."""
    frames = []
    for index in range(count):
        rng = np.random.default_rng(100 + index)
        blocks = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        blocks[..., index % 3] = 255 - blocks[..., index % 3] // 4
        frames.append(Image.fromarray(blocks).resize((192, 192), Image.Resampling.NEAREST))
    return frames


def _audited_reads(upload_id: int) -> list[dict[str, object]]:
    with TEST_RUNTIME.session() as session:
        return [
            event.after or {}
            for event in session.scalars(
                select(AuditEvent)
                .where(
                    AuditEvent.action == "evidence.read", AuditEvent.subject_id == str(upload_id)
                )
                .order_by(AuditEvent.id)
            )
        ]


@pytest.mark.e2e
@pytest.mark.usefixtures("clean_db", "worker")
def test_a_gif_hit_on_frame_5_keeps_what_was_screened_sealed(tmp_path: Path) -> None:
    frames = _frames(8)
    gif = write(tmp_path / "animation.gif", animated_gif(frames))
    with Image.open(gif) as as_decoded:
        as_decoded.seek(5)
        fifth = as_decoded.convert("RGB")
    with TEST_RUNTIME.session() as session:
        bank = banks.create_bank(session, "frames")
        banks.add_entries(session, bank, [banks.NewEntry(pdq=pdq(fifth))], added_by="test")
    (upload_id,) = submit_uris(TEST_RUNTIME, [gif.as_uri()])
    (upload,) = wait_until_final(TEST_RUNTIME, [upload_id], timeout_s=60)
    assert upload.status is UploadStatus.SCREENED
    # The URI now serves something else: what was kept is what was screened.
    write(gif, animated_gif(_frames(3)[::-1]))
    with TEST_RUNTIME.session() as session:
        hit = session.scalars(select(Hit).where(Hit.upload_id == upload_id)).one()
        kept = session.get_one(Evidence, upload_id)
        assert hit.frame_index == 5
        assert (kept.state, kept.source) == (EvidenceState.PRESERVED, EvidenceSource.SCREENING)
        assert kept.frames == list(range(8))
        assert kept.frame_count == 8
        expires = kept.expires_at
        assert expires is not None
        assert timedelta(days=89) < expires - kept.captured_at <= timedelta(days=90)
        sha = kept.screened_sha256
    vault = _vault()
    on_disk = Path(TEST_SETTINGS.evidence_uri) / frame_name(upload_id, sha, 5)
    assert on_disk.exists()
    assert not _is_image(on_disk.read_bytes())
    assert _audited_reads(upload_id) == []
    with TEST_RUNTIME.session() as session:
        (jpeg,) = evidence.read_frames(
            session, vault, upload_id, [5], actor="key:1:ada", purpose="revealed"
        )
    shown = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)
    means = [np.asarray(f.resize(shown.shape[1::-1]), dtype=np.float32) for f in frames]
    errors = [float(np.abs(shown - m).mean()) for m in means]
    assert int(np.argmin(errors)) == 5, errors
    assert _audited_reads(upload_id) == [{"frames": [5], "purpose": "revealed"}]
    with TEST_RUNTIME.session() as session:
        report = evidence.read_report(session, vault, upload_id, actor="key:1:ada")
    assert report["sha256"] == sha.hex()
    assert [m["frame_index"] for m in report["matches"]] == [5]
    assert len(_audited_reads(upload_id)) == 2


@pytest.mark.usefixtures("clean_db")
def test_a_later_hit_keeps_refetched_bytes_only_if_they_are_the_screened_ones(
    tmp_path: Path,
) -> None:
    same = seed_hit(tmp_path / "same", bank_name="one", seed=1)
    changed = seed_hit(tmp_path / "changed", bank_name="two", seed=2)
    gone = seed_hit(tmp_path / "gone", bank_name="three", seed=3)
    changed.image.write_bytes(_jpeg((0, 255, 0)))
    gone.image.unlink()
    assert CAPTURE.run(TEST_RUNTIME, complete=True) == {
        "evidence_preserved": 1,
        "evidence_changed": 1,
        "evidence_unavailable": 1,
    }
    with TEST_RUNTIME.session() as session:
        rows = {row.upload_id: row for row in session.scalars(select(Evidence))}
    assert rows[same.upload_id].state is EvidenceState.PRESERVED
    assert rows[same.upload_id].source is EvidenceSource.REFETCH
    assert rows[changed.upload_id].state is EvidenceState.CHANGED
    observed = rows[changed.upload_id].observed_sha256
    assert observed is not None
    assert observed.hex() in (rows[changed.upload_id].detail or "")
    assert rows[gone.upload_id].state is EvidenceState.UNAVAILABLE
    with TEST_RUNTIME.session() as session, pytest.raises(evidence.EvidenceNotKept):
        evidence.read_frames(
            session, _vault(), changed.upload_id, [0], actor="key:1:ada", purpose="revealed"
        )
    # Nothing is due any more: each upload was taken once.
    assert CAPTURE.run(TEST_RUNTIME, complete=True) == {}


@pytest.mark.usefixtures("clean_db")
def test_evidence_past_retention_is_deleted_unless_held(tmp_path: Path) -> None:
    expiring = seed_hit(tmp_path / "a", bank_name="one", seed=1)
    escalated = seed_hit(tmp_path / "b", bank_name="two", seed=2)
    held = seed_hit(tmp_path / "c", bank_name="three", seed=3)
    CAPTURE.run(TEST_RUNTIME, complete=True)
    with TEST_RUNTIME.session() as session:
        review.decide(session, TEST_SETTINGS, escalated.hit_id, "escalate", None, "key:1:ada")
        assert evidence.hold(session, held.upload_id, actor="cli:lawyer", reason="subpoena")
    root = Path(TEST_SETTINGS.evidence_uri)
    files = {
        s.upload_id: sorted((root / f"uploads/{s.upload_id}").rglob("*.jpg"))
        for s in (expiring, escalated, held)
    }
    assert all(files.values())
    # Nothing is due yet.
    assert PURGE.run(TEST_RUNTIME, complete=True) == {"evidence_purged": 0}
    with TEST_RUNTIME.session() as session:
        future = datetime.now(UTC) + timedelta(days=91)
        assert evidence.purge_expired(session, open_store(str(root)), now=future) == 1
    with TEST_RUNTIME.session() as session:
        rows = {row.upload_id: row for row in session.scalars(select(Evidence))}
        holds = session.scalars(
            select(AuditEvent.actor).where(AuditEvent.action == "evidence.hold")
        ).all()
    assert rows[expiring.upload_id].state is EvidenceState.EXPIRED
    assert rows[expiring.upload_id].deleted_at is not None
    assert not any(path.exists() for path in files[expiring.upload_id])
    for kept in (escalated, held):
        assert rows[kept.upload_id].state is EvidenceState.PRESERVED
        assert rows[kept.upload_id].legal_hold
        assert all(path.exists() for path in files[kept.upload_id])
    assert sorted(holds) == ["cli:lawyer", "key:1:ada"]
    # Released, the held one goes at the next purge past its retention.
    with TEST_RUNTIME.session() as session:
        assert evidence.release(session, held.upload_id, actor="cli:lawyer")
        assert evidence.purge_expired(session, open_store(str(root)), now=future) == 1
    assert not any(path.exists() for path in files[held.upload_id])
    assert os.listdir(root / "uploads")
