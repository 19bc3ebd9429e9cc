"""A running matcher applies bank changes by what changed, and ends where a fresh load is.

The reference is `load_index`, read afresh after every change: an incremental refresh
must find exactly the same matches, for every kind of change, or a kind of change is
being missed or misapplied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from moderation.banks import changes, clip_methods, clip_search, live, rows
from moderation.banks import service as banks
from moderation.banks.clip_plan import ClipPlan
from moderation.banks.index import BankIndex
from moderation.banks.live import LiveBanks, Refreshed
from moderation.banks.matcher import BankMatcher, MatchSettings, load_index
from moderation.banks.models import (
    Bank,
    BankChange,
    BankChangeReader,
    BankChangesHorizon,
    BankEntry,
    BankEntryEmbedding,
)
from moderation.banks.pruning import Pruned, prune_changes, pruned_through
from moderation.banks.reads import Reading
from moderation.embedding.models import EmbeddingModel
from moderation.embedding.service import get_or_create_model, vector_to_bytes
from moderation.images.hashing import PdqHash
from moderation.images.signals import FrameSignals, ImageSignals
from tests.conftest import TEST_RUNTIME
from tests.vectors import at_cosine_distance

DIM = 8
SETTINGS = MatchSettings(default_radius=0.05, pdq_threshold=31, pdq_min_quality=50)
_RNG = np.random.default_rng(20261129)
ANCHORS = [row / np.linalg.norm(row) for row in _RNG.standard_normal((5, DIM)).astype(np.float32)]
SHAS = [bytes([i]) * 32 for i in range(1, 5)]
PDQ_BASES = [_RNG.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(4)]
RADII = [None, 0.03, 0.06, 0.09]

Found = list[tuple[int, int, str, float, int]]


def _signals(sha: bytes, pdq: bytes) -> ImageSignals:
    return ImageSignals(
        sha256=sha,
        format="PNG",
        width=10,
        height=10,
        frame_count=1,
        frames=[FrameSignals(index=0, pdq=PdqHash(pdq, 100), pixels=np.zeros(1))],
    )


def _probe(index: BankIndex) -> Found:
    """Every match of a set of probes that come near every anchor, hash and PDQ base."""
    found = []
    for i, anchor in enumerate(ANCHORS):
        signals = _signals(SHAS[i % len(SHAS)], PDQ_BASES[i % len(PDQ_BASES)])
        found += [
            (m.bank_entry_id, m.bank_id, m.signal.value, m.distance, i)
            for m in index.match(signals, anchor[np.newaxis])
        ]
    return sorted(found)


def _flipped(bits: bytes, count: int, rng: np.random.Generator) -> bytes:
    value = bytearray(bits)
    for bit in rng.choice(256, count, replace=False):
        value[bit // 8] ^= 1 << (bit % 8)
    return bytes(value)


def _random_pdq(rng: np.random.Generator) -> tuple[bytes, int | None]:
    base = PDQ_BASES[rng.integers(len(PDQ_BASES))]
    quality = [None, 10, 80][rng.integers(3)]  # 10: below the minimum, never matched
    return _flipped(base, int(rng.integers(0, 40)), rng), quality


def _random_vector(rng: np.random.Generator) -> np.ndarray:
    anchor = ANCHORS[rng.integers(len(ANCHORS))]
    return at_cosine_distance(anchor, float(rng.uniform(0, 0.1)), seed=int(rng.integers(1 << 30)))


def _random_entry(rng: np.random.Generator, model: EmbeddingModel) -> banks.NewEntry:
    sha = SHAS[rng.integers(len(SHAS))] if rng.random() < 0.5 else None
    pdq = PdqHash(*_random_pdq(rng)) if rng.random() < 0.6 else None
    vector = _random_vector(rng) if rng.random() < 0.7 or (sha is None and pdq is None) else None
    return banks.NewEntry(sha256=sha, pdq=pdq, embedding=vector, model=model)


class Changer:
    """Random changes of every kind the matcher must follow, made as the service and
    plain SQL make them."""

    def __init__(self, session: Session, model: EmbeddingModel, other: EmbeddingModel) -> None:
        self.session = session
        self.model = model
        self.other = other
        self.rng = np.random.default_rng(7)
        self.created = 0
        self.kinds: list[Callable[[], None]] = [
            self.add_entries,
            self.add_entries,
            self.copy_entries,
            self.remove_entry,
            self.remove_entry,
            self.toggle_bank,
            self.change_radius,
            self.reembed,
            self.drop_embedding,
            self.embed_anew,
            self.rehash,
            self.move_entry,
            self.create_bank,
            self.delete_bank,
            self.embed_under_other_model,
        ]

    def step(self) -> str:
        kind = self.kinds[self.rng.integers(len(self.kinds))]
        kind()
        self.step_done()
        return kind.__name__

    def step_done(self) -> None:
        self.session.flush()
        self.session.expire_all()

    def _bank(self, enabled: bool | None = None) -> Bank | None:
        query = select(Bank).order_by(Bank.id).execution_options(populate_existing=True)
        if enabled is not None:
            query = query.where(Bank.enabled.is_(enabled))
        found = self.session.scalars(query).all()
        return found[int(self.rng.integers(len(found)))] if found else None

    def _entry(self, *, embedded: bool | None = None) -> int | None:
        query = select(BankEntry.id).order_by(BankEntry.id)
        has_vector = select(BankEntryEmbedding.id).where(
            BankEntryEmbedding.bank_entry_id == BankEntry.id,
            BankEntryEmbedding.model_id == self.model.id,
        )
        if embedded is not None:
            query = query.where(has_vector.exists() if embedded else ~has_vector.exists())
        ids = self.session.scalars(query).all()
        return int(ids[int(self.rng.integers(len(ids)))]) if ids else None

    def create_bank(self) -> None:
        self.created += 1
        radius = RADII[self.rng.integers(len(RADII))]
        bank = banks.create_bank(self.session, f"random-{self.created}", radius)
        entries = [_random_entry(self.rng, self.model) for _ in range(3)]
        banks.add_entries(self.session, bank, entries, added_by="t")

    def add_entries(self) -> None:
        bank = self._bank()
        if bank is None:
            return self.create_bank()
        count = int(self.rng.integers(1, 4))
        entries = [_random_entry(self.rng, self.model) for _ in range(count)]
        banks.add_entries(self.session, bank, entries, added_by="t")
        return None

    def copy_entries(self) -> None:
        bank = self._bank()
        if bank is None:
            return self.create_bank()
        count = int(self.rng.integers(1, 5))
        vectors = np.stack([_random_vector(self.rng) for _ in range(count)])
        pdq = np.stack([np.frombuffer(_random_pdq(self.rng)[0], np.uint8) for _ in range(count)])
        banks.copy_entries(
            self.session, bank, model=self.model, vectors=vectors, pdq=pdq, added_by="t"
        )
        return None

    def remove_entry(self) -> None:
        entry_id = self._entry()
        if entry_id is not None:
            bank = self.session.scalars(
                select(Bank).join(BankEntry).where(BankEntry.id == entry_id)
            ).one()
            banks.remove_entry(self.session, bank, entry_id, actor="t")

    def toggle_bank(self) -> None:
        bank = self._bank()
        if bank is not None:
            banks.update_bank(self.session, bank, actor="t", enabled=not bank.enabled)

    def change_radius(self) -> None:
        bank = self._bank()
        if bank is not None:
            radius = RADII[self.rng.integers(len(RADII))]
            banks.update_bank(self.session, bank, actor="t", radius=radius)

    def reembed(self) -> None:
        entry_id = self._entry(embedded=True)
        if entry_id is not None:
            self.session.execute(
                update(BankEntryEmbedding)
                .where(
                    BankEntryEmbedding.bank_entry_id == entry_id,
                    BankEntryEmbedding.model_id == self.model.id,
                )
                .values(vector=vector_to_bytes(_random_vector(self.rng)))
            )

    def drop_embedding(self) -> None:
        entry_id = self._entry(embedded=True)
        if entry_id is not None:
            self.session.execute(
                delete(BankEntryEmbedding).where(
                    BankEntryEmbedding.bank_entry_id == entry_id,
                    BankEntryEmbedding.model_id == self.model.id,
                )
            )

    def embed_anew(self) -> None:
        entry_id = self._entry(embedded=False)
        if entry_id is not None:
            self.session.execute(
                insert(BankEntryEmbedding).values(
                    bank_entry_id=entry_id,
                    model_id=self.model.id,
                    vector=vector_to_bytes(_random_vector(self.rng)),
                )
            )

    def embed_under_other_model(self) -> None:
        """Another model's embeddings are no change to this model's matcher."""
        entry_id = self._entry()
        if entry_id is not None:
            self.session.execute(
                delete(BankEntryEmbedding).where(
                    BankEntryEmbedding.bank_entry_id == entry_id,
                    BankEntryEmbedding.model_id == self.other.id,
                )
            )
            self.session.execute(
                insert(BankEntryEmbedding).values(
                    bank_entry_id=entry_id,
                    model_id=self.other.id,
                    vector=vector_to_bytes(np.ones(3, np.float32)),
                )
            )

    def rehash(self) -> None:
        entry_id = self._entry()
        if entry_id is not None:
            pdq, quality = _random_pdq(self.rng)
            sha = SHAS[self.rng.integers(len(SHAS))] if self.rng.random() < 0.5 else None
            self.session.execute(
                update(BankEntry)
                .where(BankEntry.id == entry_id)
                .values(sha256=sha, pdq=pdq, pdq_quality=quality)
            )

    def move_entry(self) -> None:
        entry_id, bank = self._entry(), self._bank()
        if entry_id is not None and bank is not None:
            self.session.execute(
                update(BankEntry).where(BankEntry.id == entry_id).values(bank_id=bank.id)
            )

    def delete_bank(self) -> None:
        bank = self._bank()
        if bank is not None:
            self.session.execute(delete(Bank).where(Bank.id == bank.id))


@pytest.fixture
def models(session: Session) -> tuple[EmbeddingModel, EmbeddingModel]:
    return (
        get_or_create_model(session, "refresh-model", DIM),
        get_or_create_model(session, "refresh-other-model", 3),
    )


def _reading(model: EmbeddingModel) -> Reading:
    return Reading(model.id, DIM, SETTINGS.default_radius, SETTINGS.pdq_min_quality)


@pytest.mark.parametrize(
    "method",
    [clip_methods.TORCH_FLOAT32, clip_methods.TORCH_FLOAT16, clip_methods.FAISS_SCAN],
    ids=["host", "device-copy", "faiss"],
)
def test_a_refreshed_index_matches_a_fresh_load_after_every_kind_of_change(
    session: Session,
    models: tuple[EmbeddingModel, EmbeddingModel],
    monkeypatch: pytest.MonkeyPatch,
    method: clip_methods.Method,
) -> None:
    """`device-copy`: the vectors are scored from a float16 copy that appends and growth
    must keep in step, as a GPU-resident bank is (here on the CPU)."""
    model, other = models
    monkeypatch.setattr(clip_search, "default_plan", lambda device: ClipPlan.only(method))
    # Small stores, so that the random changes make them grow and compact many times.
    monkeypatch.setattr(rows, "GROW_MIN", 1)
    monkeypatch.setattr(rows, "COMPACT_MIN", 3)
    # Few rows per first read, so that checks take both ways of reading (see `_FEW`).
    monkeypatch.setattr(changes, "_FEW", 2)
    compactions = 0
    compacted = rows.SignalRows.compacted

    def counted(store: rows.SignalRows) -> rows.SignalRows:
        nonlocal compactions
        compactions += 1
        return compacted(store)

    monkeypatch.setattr(rows.SignalRows, "compacted", counted)
    changer = Changer(session, model, other)
    for _ in range(3):
        changer.create_bank()
    session.flush()
    index = LiveBanks.load(session, _reading(model), SETTINGS)
    assert _probe(index.snapshot()) == _probe(load_index(session, model.id, DIM, SETTINGS))

    kinds_applied: set[str] = set()
    for step in range(120):
        before = index.snapshot()
        before_found = _probe(before)
        kind = changer.step()
        refreshed = index.refresh(session)
        expected = _probe(load_index(session, model.id, DIM, SETTINGS))
        assert _probe(index.snapshot()) == expected, f"step {step}: {kind}"
        if kind == "embed_under_other_model":
            assert refreshed is None
        if refreshed is not None:
            assert not refreshed.loaded, f"step {step}: {kind} was applied by a full load"
            kinds_applied.add(kind)
        # A snapshot never changes once made, whatever the stores do after.
        assert _probe(before) == before_found, f"step {step}: {kind} changed an old snapshot"
    assert kinds_applied == {kind.__name__ for kind in changer.kinds} - {"embed_under_other_model"}
    assert compactions > 0
    assert expected, "the probes found nothing: the comparison proved little"


def test_another_models_embeddings_are_no_change(
    session: Session, models: tuple[EmbeddingModel, EmbeddingModel]
) -> None:
    model, other = models
    bank = banks.create_bank(session, "two-models")
    (entry,) = banks.add_entries(session, bank, [banks.NewEntry(sha256=SHAS[0])], added_by="t")
    index = LiveBanks.load(session, _reading(model), SETTINGS)
    session.add(BankEntryEmbedding(bank_entry_id=entry.id, model_id=other.id, vector=b"\0" * 12))
    session.flush()
    assert index.refresh(session) is None


def test_a_truncated_table_is_read_again_whole(
    session: Session, models: tuple[EmbeddingModel, EmbeddingModel]
) -> None:
    model, _ = models
    bank = banks.create_bank(session, "truncated")
    banks.add_entries(session, bank, [banks.NewEntry(sha256=SHAS[0])], added_by="t")
    index = LiveBanks.load(session, _reading(model), SETTINGS)
    assert _probe(index.snapshot())
    session.execute(text("TRUNCATE banks CASCADE"))
    refreshed = index.refresh(session)
    assert refreshed is not None
    assert refreshed.loaded
    assert _probe(index.snapshot()) == []


# `few`: the rows a check reads before it counts them all (see `changes._FEW`).
@pytest.mark.parametrize("few", [1000, 3])
def test_a_change_naming_much_of_the_index_is_applied_by_a_full_load(
    session: Session,
    models: tuple[EmbeddingModel, EmbeddingModel],
    monkeypatch: pytest.MonkeyPatch,
    few: int,
) -> None:
    model, _ = models
    monkeypatch.setattr(live, "REBUILD_MIN", 4)
    monkeypatch.setattr(changes, "_FEW", few)
    bank = banks.create_bank(session, "bulk")
    rng = np.random.default_rng(3)
    banks.add_entries(session, bank, [_random_entry(rng, model) for _ in range(8)], added_by="t")
    index = LiveBanks.load(session, _reading(model), SETTINGS)
    banks.add_entries(session, bank, [_random_entry(rng, model) for _ in range(2)], added_by="t")
    refreshed = index.refresh(session)
    assert refreshed is not None
    assert not refreshed.loaded
    banks.add_entries(session, bank, [_random_entry(rng, model) for _ in range(9)], added_by="t")
    refreshed = index.refresh(session)
    assert refreshed is not None
    assert refreshed.loaded
    assert _probe(index.snapshot()) == _probe(load_index(session, model.id, DIM, SETTINGS))


def test_a_refresh_that_fails_changes_nothing_and_the_next_applies_its_changes(
    session: Session,
    models: tuple[EmbeddingModel, EmbeddingModel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _ = models
    bank = banks.create_bank(session, "flaky")
    (kept,) = banks.add_entries(session, bank, [banks.NewEntry(sha256=SHAS[0])], added_by="t")
    index = LiveBanks.load(session, _reading(model), SETTINGS)
    before = _probe(index.snapshot())
    (added,) = banks.add_entries(session, bank, [banks.NewEntry(sha256=SHAS[1])], added_by="t")
    banks.remove_entry(session, bank, kept.id, actor="t")

    def unreachable(*args: object) -> None:
        raise ConnectionError("the database went away")

    with monkeypatch.context() as patched:
        patched.setattr(live, "read_entries", unreachable)
        with pytest.raises(ConnectionError):
            index.refresh(session)
    assert _probe(index.snapshot()) == before
    assert index.refresh(session) is not None
    assert [entry for entry, *_ in _probe(index.snapshot())] == [added.id]


# Out-of-order commits need transactions of their own: these tests commit, and empty the
# bank tables before and after.


@pytest.fixture
def committed(database: str) -> Iterator[int]:
    """The id of a model, committed, with empty bank tables."""
    empty = text(
        "TRUNCATE retrohunt_jobs, hits, bank_entry_embeddings, bank_entries, banks CASCADE"
    )
    with TEST_RUNTIME.engine.begin() as conn:
        conn.execute(empty)
    with TEST_RUNTIME.session() as session:
        model_id = get_or_create_model(session, "refresh-committed", DIM).id
    yield model_id
    with TEST_RUNTIME.engine.begin() as conn:
        conn.execute(empty)
        # Never done in production, where the horizon only rises.
        conn.execute(update(BankChangesHorizon).values(pruned_through=0, pruned_at=None))


@contextmanager
def _open_transaction() -> Iterator[Session]:
    """A session whose transaction stays open until the block ends, then commits."""
    with Session(TEST_RUNTIME.engine) as session, session.begin():
        yield session


@dataclass
class _OutOfOrder:
    """Two entries whose change rows took ids in one order and commit in the other."""

    matcher: BankMatcher
    lower_id: int
    higher_id: int

    def found(self, sha: bytes) -> set[int]:
        index = self.matcher.current()
        no_vector = np.zeros((1, DIM), np.float32)
        return {m.bank_entry_id for m in index.match(_signals(sha, PDQ_BASES[0]), no_vector)}


@contextmanager
def _lower_id_left_open(bank_name: str, model_id: int) -> Iterator[_OutOfOrder]:
    """Entry A's change row takes its id first, entry B's second; B commits, and is
    matched, while A's transaction stays open until the block ends (then commits)."""
    with TEST_RUNTIME.session() as session:
        bank_id = banks.create_bank(session, bank_name).id
    matcher = BankMatcher(
        TEST_RUNTIME.session, model_id=model_id, dim=DIM, settings=SETTINGS, refresh_s=0
    )
    with _open_transaction() as slow:
        lower = BankEntry(bank_id=bank_id, sha256=SHAS[0], added_by="slow")
        slow.add(lower)
        slow.flush()  # its change row takes the lower id now
        with TEST_RUNTIME.session() as fast:
            higher = BankEntry(bank_id=bank_id, sha256=SHAS[1], added_by="fast")
            fast.add(higher)
            fast.flush()
            higher_id = higher.id
        assert lower.id < higher_id
        entries = _OutOfOrder(matcher, lower.id, higher_id)
        assert entries.found(SHAS[1]) == {higher_id}
        yield entries


def test_a_lower_id_committed_after_a_higher_one_is_not_skipped(committed: int) -> None:
    """A must be matched once it commits, however many checks passed meanwhile (a
    checkpoint at the highest id seen would have skipped it forever)."""
    with _lower_id_left_open("out-of-order", committed) as entries:
        for _ in range(3):  # checks while the lower one is still open
            assert entries.found(SHAS[0]) == set()
    assert entries.found(SHAS[0]) == {entries.lower_id}
    assert entries.found(SHAS[1]) == {entries.higher_id}


# The change log pruned (`moderation.banks.pruning`): a matcher whose checkpoint is below
# the horizon cannot tell what it missed and must load everything.

# Long enough for the transactions of a busy test server to end (see `settled_value`).
_SETTLE_WAIT_S = 30.0


def _last_change() -> int:
    with TEST_RUNTIME.session() as session:
        return int(session.scalar(select(func.max(BankChange.id))) or 0)


def _prune_through(last: int, settle_wait_s: float = _SETTLE_WAIT_S) -> Pruned:
    """Make the log rows up to `last` older than the retention, and prune (the log's
    durable readers, the retro-hunt's starter, have read it all)."""
    with TEST_RUNTIME.session() as session:
        session.execute(
            update(BankChange)
            .where(BankChange.id <= last)
            .values(created_at=func.now() - timedelta(days=2))
        )
        session.execute(update(BankChangeReader).values(checkpoint=last))
    return prune_changes(
        TEST_RUNTIME.session, timedelta(hours=1), batches=None, settle_wait_s=settle_wait_s
    )


def _committed_banks(model_id: int) -> tuple[Changer, LiveBanks]:
    """Banks made by a `Changer` and committed, and a matcher loaded from them."""
    with TEST_RUNTIME.session() as session:
        model = session.get_one(EmbeddingModel, model_id)
        other = get_or_create_model(session, "refresh-committed-other", 3)
        changer = Changer(session, model, other)
        for _ in range(3):
            changer.create_bank()
    with TEST_RUNTIME.session() as session:
        return changer, LiveBanks.load(session, _reading(model), SETTINGS)


def _change(changer: Changer, *kinds: Callable[[Changer], object]) -> None:
    """Changes of these kinds, committed together."""
    with TEST_RUNTIME.session() as session:
        changer.session = session
        for kind in kinds:
            kind(changer)
            changer.step_done()


def _refreshed(index: LiveBanks, model_id: int) -> tuple[Refreshed | None, Found]:
    """A refresh, and what a fresh load finds."""
    with TEST_RUNTIME.session() as session:
        refreshed = index.refresh(session)
        return refreshed, _probe(load_index(session, model_id, DIM, SETTINGS))


def test_a_matcher_below_the_pruned_horizon_loads_everything_and_ends_as_a_fresh_load(
    committed: int,
) -> None:
    changer, index = _committed_banks(committed)
    _change(changer, *[Changer.step] * 30)  # not yet read by the matcher
    last = _last_change()
    assert _prune_through(last).through == last
    assert index.checkpoint < last
    before = _probe(index.snapshot())
    refreshed, expected = _refreshed(index, committed)
    assert refreshed is not None
    assert refreshed.loaded
    assert _probe(index.snapshot()) == expected
    assert expected != before, "the pruned changes changed nothing: the test proved little"
    # Its checkpoint is at the horizon now: the next change is applied by what it names.
    assert index.checkpoint >= last
    _change(changer, Changer.add_entries)
    refreshed, expected = _refreshed(index, committed)
    assert refreshed is not None
    assert not refreshed.loaded
    assert _probe(index.snapshot()) == expected


def test_a_matcher_above_the_pruned_horizon_goes_on_applying_what_changed(
    committed: int,
) -> None:
    changer, index = _committed_banks(committed)
    _change(changer, *[Changer.step] * 10)
    last = _last_change()
    deadline = time.monotonic() + _SETTLE_WAIT_S
    while index.checkpoint < last and time.monotonic() < deadline:
        with TEST_RUNTIME.session() as session:
            index.refresh(session)
        time.sleep(0.01)
    assert _prune_through(last).through == last
    assert index.checkpoint >= last
    for kind in (Changer.add_entries, Changer.remove_entry, Changer.toggle_bank):
        _change(changer, kind)
        refreshed, expected = _refreshed(index, committed)
        assert refreshed is not None, kind.__name__
        assert not refreshed.loaded, kind.__name__
        assert _probe(index.snapshot()) == expected, kind.__name__


def test_a_prune_while_a_lower_id_is_uncommitted_does_not_skip_it(committed: int) -> None:
    """As `test_a_lower_id_committed_after_a_higher_one_is_not_skipped`, with the log
    pruned, every row old enough, while the lower id's transaction is open: the horizon
    must not pass it, or the matcher would load everything (the lower entry not yet
    committed), take the horizon as its checkpoint and never read the lower row."""
    with _lower_id_left_open("pruned-out-of-order", committed) as entries:
        _prune_through(_last_change(), settle_wait_s=0.2)
        assert entries.found(SHAS[0]) == set()
        assert entries.found(SHAS[1]) == {entries.higher_id}
    assert entries.found(SHAS[0]) == {entries.lower_id}
    assert entries.found(SHAS[1]) == {entries.higher_id}
    _prune_through(_last_change())  # and once it has committed, the log is pruned
    assert entries.found(SHAS[0]) == {entries.lower_id}


_READ_HORIZON = "moderation.banks.changes.pruned_through"


def test_a_prune_between_the_reads_of_a_check_misses_nothing(
    committed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check reads the horizon after the rows: a prune that commits between the two is
    seen by the second, one that commits before both by both. (Read first, the horizon
    could be passed by a prune before the rows were read, and the rows it deleted never
    seen.) Here the prune commits just after the horizon is read."""
    changer, index = _committed_banks(committed)
    _change(changer, *[Changer.step] * 30)
    last = _last_change()
    read_horizon = pruned_through

    def then_pruned(session: Session) -> int:
        horizon = read_horizon(session)
        monkeypatch.setattr(_READ_HORIZON, read_horizon)
        assert _prune_through(last).through == last
        return horizon

    monkeypatch.setattr(_READ_HORIZON, then_pruned)
    before = _probe(index.snapshot())
    refreshed, expected = _refreshed(index, committed)
    assert refreshed is not None
    assert _probe(index.snapshot()) == expected
    assert expected != before, "the pruned changes changed nothing: the test proved little"
    refreshed, expected = _refreshed(index, committed)
    assert _probe(index.snapshot()) == expected
