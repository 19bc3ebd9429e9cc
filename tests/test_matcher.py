from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.banks import service as banks
from moderation.banks.clip_search import ClipRows
from moderation.banks.matcher import BankMatcher, MatchSettings, load_index
from moderation.banks.models import BankEntry, BankEntryEmbedding
from moderation.embedding.models import EmbeddingModel
from moderation.embedding.service import get_or_create_model, vector_to_bytes
from moderation.images.hashing import PdqHash
from moderation.images.signals import FrameSignals, ImageSignals, SignalType
from tests.vectors import at_cosine_distance

DIM = 8
SETTINGS = MatchSettings(default_radius=0.05, pdq_threshold=31, pdq_min_quality=50)
ANCHOR = np.eye(DIM, dtype=np.float32)[0]


def _signals(
    sha: bytes = b"\x01" * 32, pdq_bits: bytes = b"\x00" * 32, quality: int = 100, frames: int = 1
) -> ImageSignals:
    return ImageSignals(
        sha256=sha,
        format="PNG",
        width=10,
        height=10,
        frame_count=frames,
        frames=[
            FrameSignals(index=i, pdq=PdqHash(pdq_bits, quality), pixels=np.zeros(1))
            for i in range(frames)
        ],
    )


def _flip(bits: int) -> bytes:
    """A PDQ hash that differs from all-zeros in `bits` bits."""
    return (int("1" * bits, 2) if bits else 0).to_bytes(32, "big")


@pytest.fixture
def model(session: Session) -> EmbeddingModel:
    return get_or_create_model(session, "test-model", DIM)


def _matches(
    session: Session, model: EmbeddingModel, signals: ImageSignals, vectors: np.ndarray
) -> set[tuple[int, SignalType, float]]:
    index = load_index(session, model.id, DIM, SETTINGS)
    return {
        (m.bank_entry_id, m.signal, round(m.distance, 5)) for m in index.match(signals, vectors)
    }


def test_clip_radius_is_inclusive_and_per_bank(session: Session, model: EmbeddingModel) -> None:
    default = banks.create_bank(session, "default-radius")
    wide = banks.create_bank(session, "wide", radius=0.08)
    near, far, far_in_wide = banks.add_entries(
        session,
        default,
        [
            banks.NewEntry(embedding=at_cosine_distance(ANCHOR, 0.04), model=model),
            banks.NewEntry(embedding=at_cosine_distance(ANCHOR, 0.06, seed=1), model=model),
        ],
        added_by="test",
    ) + banks.add_entries(
        session,
        wide,
        [banks.NewEntry(embedding=at_cosine_distance(ANCHOR, 0.06, seed=2), model=model)],
        added_by="test",
    )
    found = _matches(session, model, _signals(), ANCHOR[np.newaxis])
    assert found == {(near.id, SignalType.CLIP, 0.04), (far_in_wide.id, SignalType.CLIP, 0.06)}
    assert far.id not in {entry for entry, _, _ in found}
    # Each hit carries the radius it was held to, its own bank's.
    index = load_index(session, model.id, DIM, SETTINGS)
    assert {m.bank_entry_id: m.threshold for m in index.match(_signals(), ANCHOR[np.newaxis])} == {
        near.id: SETTINGS.default_radius,
        far_in_wide.id: 0.08,
    }


def test_exactly_at_the_radius_is_a_hit(session: Session, model: EmbeddingModel) -> None:
    bank = banks.create_bank(session, "edge")
    (entry, _just_outside) = banks.add_entries(
        session,
        bank,
        [
            banks.NewEntry(embedding=at_cosine_distance(ANCHOR, 0.05), model=model),
            banks.NewEntry(embedding=at_cosine_distance(ANCHOR, 0.0501, seed=4), model=model),
        ],
        added_by="t",
    )
    assert {e for e, _, _ in _matches(session, model, _signals(), ANCHOR[np.newaxis])} == {entry.id}


def test_pdq_threshold_is_inclusive_and_low_quality_is_ignored(
    session: Session, model: EmbeddingModel
) -> None:
    bank = banks.create_bank(session, "pdq")
    at_31, _at_32, _low_quality = banks.add_entries(
        session,
        bank,
        [
            banks.NewEntry(pdq=PdqHash(_flip(31), None)),
            banks.NewEntry(pdq=PdqHash(_flip(32), None)),
            banks.NewEntry(pdq=PdqHash(_flip(0), 10)),
        ],
        added_by="test",
    )
    found = _matches(session, model, _signals(pdq_bits=_flip(0)), np.zeros((1, DIM), np.float32))
    assert found == {(at_31.id, SignalType.PDQ, 31.0)}
    index = load_index(session, model.id, DIM, SETTINGS)
    (match,) = index.match(_signals(pdq_bits=_flip(0)), np.zeros((1, DIM), np.float32))
    assert match.threshold == SETTINGS.pdq_threshold == 31
    # A low-quality upload frame is not matched on PDQ at all.
    assert (
        _matches(
            session, model, _signals(pdq_bits=_flip(0), quality=20), np.zeros((1, DIM), np.float32)
        )
        == set()
    )


def test_a_photo_stored_turned_matches_on_either_orientation(
    session: Session, model: EmbeddingModel
) -> None:
    bank = banks.create_bank(session, "turned")
    as_stored, upright = banks.add_entries(
        session,
        bank,
        [banks.NewEntry(pdq=PdqHash(_flip(200), None)), banks.NewEntry(pdq=PdqHash(_flip(0), 90))],
        added_by="test",
    )
    turned = replace(_signals(pdq_bits=_flip(100)), pdq_as_stored=PdqHash(_flip(203), 90))
    no_vector = np.zeros((1, DIM), np.float32)
    assert _matches(session, model, turned, no_vector) == {(as_stored.id, SignalType.PDQ, 3.0)}
    # Upright, it matches the entry hashed upright; as stored, the one hashed as stored.
    both = replace(_signals(pdq_bits=_flip(2)), pdq_as_stored=PdqHash(_flip(200), 90))
    assert _matches(session, model, both, no_vector) == {
        (upright.id, SignalType.PDQ, 2.0),
        (as_stored.id, SignalType.PDQ, 0.0),
    }


def test_sha256_and_disabled_banks(session: Session, model: EmbeddingModel) -> None:
    enabled = banks.create_bank(session, "on")
    disabled = banks.create_bank(session, "off")
    (hit,) = banks.add_entries(
        session, enabled, [banks.NewEntry(sha256=b"\x01" * 32)], added_by="t"
    )
    banks.add_entries(session, disabled, [banks.NewEntry(sha256=b"\x01" * 32)], added_by="t")
    disabled.enabled = False
    session.flush()
    assert _matches(session, model, _signals(), np.zeros((1, DIM), np.float32)) == {
        (hit.id, SignalType.SHA256, 0.0)
    }


def test_the_closest_frame_is_recorded(session: Session, model: EmbeddingModel) -> None:
    bank = banks.create_bank(session, "frames")
    (entry,) = banks.add_entries(
        session, bank, [banks.NewEntry(embedding=ANCHOR, model=model)], added_by="t"
    )
    vectors = np.stack([at_cosine_distance(ANCHOR, 0.03), at_cosine_distance(ANCHOR, 0.01, seed=3)])
    index = load_index(session, model.id, DIM, SETTINGS)
    (match,) = index.match(_signals(frames=2), vectors)
    assert (match.bank_entry_id, match.frame_index) == (entry.id, 1)
    assert match.distance == pytest.approx(0.01, abs=1e-5)


def test_running_matcher_picks_up_bank_changes_after_its_refresh_interval(
    session: Session, model: EmbeddingModel
) -> None:
    @contextmanager
    def sessions() -> Iterator[Session]:
        yield session

    now = [1000.0]
    matcher = BankMatcher(
        sessions, model_id=model.id, dim=DIM, settings=SETTINGS, refresh_s=5, clock=lambda: now[0]
    )
    bank = banks.create_bank(session, "live")
    (entry,) = banks.add_entries(session, bank, [banks.NewEntry(sha256=b"\x01" * 32)], added_by="t")
    signals = _signals()
    vectors = np.zeros((1, DIM), np.float32)
    now[0] += 4.9
    assert matcher.current().match(signals, vectors) == []  # not yet checked
    now[0] += 0.1
    assert [m.bank_entry_id for m in matcher.current().match(signals, vectors)] == [entry.id]
    # Unchanged banks: the snapshot is kept, not rebuilt.
    before = matcher.current()
    now[0] += 5
    assert matcher.current() is before


def test_default_refresh_interval_meets_the_ten_second_promise() -> None:
    from moderation.config import Settings

    assert Settings().bank_refresh_s <= 10


def test_matching_in_many_threads_starts_no_faiss_threads(
    session: Session, model: EmbeddingModel
) -> None:
    """Faiss would give every calling thread its own OpenMP team of spinning helpers."""
    bank = banks.create_bank(session, "threads")
    banks.add_entries(
        session,
        bank,
        [banks.NewEntry(pdq=PdqHash(_flip(3), 100), embedding=ANCHOR, model=model)],
        added_by="test",
    )
    index = load_index(session, model.id, DIM, SETTINGS)
    before = set(os.listdir("/proc/self/task"))
    results: list[int] = []
    callers = [
        threading.Thread(target=lambda: results.append(len(index.match(_signals(), ANCHOR[None]))))
        for _ in range(4)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert results == [2, 2, 2, 2]  # the PDQ and the CLIP hit, in every thread
    # A joined thread may linger in /proc for a moment; any other new thread is Faiss's.
    started = set(os.listdir("/proc/self/task")) - before - {str(c.native_id) for c in callers}
    assert started == set()


def test_a_batch_of_queries_finds_what_each_finds_alone(
    session: Session, model: EmbeddingModel
) -> None:
    """Many uploads' vectors are searched in one call, one product per block of the bank;
    the radius boundary must hold there exactly as for a single query."""
    bank = banks.create_bank(session, "batched")
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((8, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    distances = (0.04, 0.05, 0.0501, 0.06)
    entries = banks.add_entries(
        session,
        bank,
        [
            banks.NewEntry(embedding=at_cosine_distance(q, d, seed=i), model=model)
            for i, q in enumerate(queries)
            for d in distances
        ],
        added_by="test",
    )
    index = load_index(session, model.id, DIM, SETTINGS)

    batched = index.search_clip(queries)
    alone = [index.search_clip(q[np.newaxis])[0] for q in queries]

    for i, (together, by_itself) in enumerate(zip(batched, alone, strict=True)):
        own = {entries[i * len(distances) + k].id: d for k, d in enumerate(distances)}
        assert {h.bank_entry_id for h in together} == {h.bank_entry_id for h in by_itself}
        assert {
            h.bank_entry_id: round(h.distance, 5) for h in together if h.bank_entry_id in own
        } == {entry_id: d for entry_id, d in own.items() if d <= 0.05}
    assert index.search_clip(queries[:0]) == []


def test_an_embedding_of_another_size_is_refused_by_name(
    session: Session, model: EmbeddingModel
) -> None:
    bank = banks.create_bank(session, "malformed")
    (entry,) = banks.add_entries(session, bank, [banks.NewEntry(sha256=b"\x02" * 32)], added_by="t")
    session.add(BankEntryEmbedding(bank_entry_id=entry.id, model_id=model.id, vector=b"\0" * 12))
    session.flush()
    with pytest.raises(ValueError, match=rf"bank entry {entry.id} has a 3-d embedding"):
        load_index(session, model.id, DIM, SETTINGS)


def test_bank_rows_grow_past_the_count_they_were_sized_for() -> None:
    """Entries committed between counting and streaming the bank are kept, not dropped,
    and a snapshot made before the rows grew still reads its own."""
    rng = np.random.default_rng(2)
    rows = ClipRows(DIM, capacity=3)
    vectors = rng.standard_normal((40, DIM)).astype(np.float32)
    early = None
    for start in range(0, 40, 7):  # 3 rows of room, then blocks of 7: grown several times
        ids = np.arange(start, min(start + 7, 40)) + 100
        rows.append(ids, ids % 2, vectors[start : start + 7])
        if early is None:
            early = rows.view()
    view = rows.view()
    assert view.entry_ids.tolist() == list(range(100, 140))
    assert view.bank_ids.tolist() == [i % 2 for i in range(100, 140)]
    assert np.array_equal(view.payload, vectors)
    assert view.payload.flags.c_contiguous
    assert early is not None
    assert early.entry_ids.tolist() == list(range(100, 107))
    assert np.array_equal(early.payload, vectors[:7])


def test_entries_copied_in_bulk_are_stored_and_matched_like_added_ones(
    session: Session, model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(banks, "_ROWS_PER_COPY", 10)  # 45 entries in five COPYs
    bank = banks.create_bank(session, "bulk")
    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((45, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[7] = at_cosine_distance(ANCHOR, 0.05)
    hashes = rng.integers(0, 256, (45, 32), dtype=np.uint8)
    hashes[3] = np.frombuffer(_flip(31), np.uint8)
    before = session.scalar(select(func.count(BankEntry.id))) or 0
    assert (
        banks.copy_entries(session, bank, model=model, vectors=vectors, pdq=hashes, added_by="bulk")
        == 45
    )
    stored = session.execute(
        select(BankEntry.pdq, BankEntry.pdq_quality, BankEntry.added_by, BankEntryEmbedding.vector)
        .join(BankEntryEmbedding)
        .where(BankEntry.bank_id == bank.id, BankEntryEmbedding.model_id == model.id)
        .order_by(BankEntry.id)
    ).all()
    assert session.scalar(select(func.count(BankEntry.id))) == before + 45
    assert [row.pdq for row in stored] == [h.tobytes() for h in hashes]
    assert [row.vector for row in stored] == [vector_to_bytes(v) for v in vectors]
    assert {(row.pdq_quality, row.added_by) for row in stored} == {(None, "bulk")}
    found = _matches(session, model, _signals(pdq_bits=_flip(0)), ANCHOR[np.newaxis])
    ids = session.scalars(
        select(BankEntry.id).where(BankEntry.bank_id == bank.id).order_by(BankEntry.id)
    ).all()
    assert found == {(ids[7], SignalType.CLIP, 0.05), (ids[3], SignalType.PDQ, 31.0)}
    # Without hashes, the entries hold only their embeddings.
    other = banks.create_bank(session, "bulk-vectors-only")
    banks.copy_entries(session, other, model=model, vectors=vectors[:5], added_by="bulk")
    assert (
        session.scalars(select(BankEntry.pdq).where(BankEntry.bank_id == other.id)).all()
        == [None] * 5
    )
