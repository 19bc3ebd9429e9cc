"""The review queue and decisions: pagination, filters, evidence, decisions and their audit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from moderation.audit.models import AuditEvent
from moderation.banks import service as banks
from moderation.images.signals import SignalType
from moderation.review import service
from moderation.review.models import Hit, ReviewStatus
from moderation.review.service import AlreadyDecided, Outcome, QueueFilter
from moderation.webhooks.models import EventType, WebhookEvent
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS, settings_for_tests
from tests.review_fixtures import make_bank, make_entry, make_hit, make_upload

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _empty(clean_db: None) -> None:
    """Start from no banks and no hits, whatever earlier tests committed."""


# Webhooks configured: confirmations are announced.
WEBHOOKS_ON = settings_for_tests(webhook_url="http://127.0.0.1:9/hook", webhook_secret="s3cret")


def _traverse(session: Session, filters: QueueFilter, limit: int) -> Iterator[list[int]]:
    cursor = None
    while True:
        page = service.queue(session, TEST_SETTINGS, filters, cursor=cursor, limit=limit)
        yield [hit.hit_id for hit in page.hits]
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def test_pages_return_every_hit_exactly_once_while_hits_arrive(session: Session) -> None:
    bank = make_bank(session, "b")
    entries = [make_entry(session, bank) for _ in range(3)]
    existing = []
    for i in range(10):
        upload = make_upload(session)
        for entry in entries:
            # Three hits per timestamp: ties broken by id, across page boundaries.
            existing.append(make_hit(session, upload, entry, created_at=T0 + timedelta(i)).id)
    seen: list[int] = []
    arrived = []
    # Every status: a decision between pages must not move the hits still to come.
    for page in _traverse(session, QueueFilter(status=None), limit=4):
        seen += page
        # Between pages: new hits arrive, and a reviewer decides one already seen.
        upload = make_upload(session)
        arrived.append(make_hit(session, upload, entries[0]).id)
        service.decide(session, TEST_SETTINGS, page[0], Outcome.DISMISS, None, "test")
    assert sorted(seen) == sorted(existing)
    assert len(seen) == len(set(seen))
    # Newest first: by created_at, then id.
    order = {hit.id: (hit.created_at, hit.id) for hit in session.scalars(select(Hit))}
    assert [order[i] for i in seen] == sorted((order[i] for i in seen), reverse=True)
    # The next traversal from the top shows what arrived, still pending.
    again = [i for page in _traverse(session, QueueFilter(), limit=7) for i in page]
    assert set(arrived) <= set(again)


def test_a_page_of_exactly_the_limit_says_it_is_the_last(session: Session) -> None:
    bank = make_bank(session, "b")
    entry = make_entry(session, bank)
    for _ in range(4):
        make_hit(session, make_upload(session), entry)
    page = service.queue(session, TEST_SETTINGS, limit=4)
    assert len(page.hits) == 4
    assert page.next_cursor is None
    assert service.count(session) == 4


def test_a_forged_cursor_is_refused(session: Session) -> None:
    for cursor in ("", "not-base64!", "W10", service.encode_cursor(T0, 1)[:-3]):
        with pytest.raises(service.InvalidCursor):
            service.queue(session, TEST_SETTINGS, cursor=cursor)


def test_filters(session: Session) -> None:
    first, second = make_bank(session, "first"), make_bank(session, "second")
    a, b = make_entry(session, first), make_entry(session, second)
    upload = make_upload(session)
    old = make_hit(session, upload, a, created_at=T0)
    clip = make_hit(session, upload, a, signal=SignalType.CLIP, distance=0.01, created_at=T0)
    retro = make_hit(session, upload, b, retroactive=True, created_at=T0 + timedelta(days=2))
    other = make_hit(session, make_upload(session), b, signal=SignalType.PDQ, distance=3)
    service.decide(session, TEST_SETTINGS, other.id, Outcome.DISMISS, "clean", "test")

    def ids(**filters: object) -> set[int]:
        page = service.queue(session, TEST_SETTINGS, QueueFilter(**filters))  # type: ignore[arg-type]
        return {hit.hit_id for hit in page.hits}

    assert ids() == {old.id, clip.id, retro.id}
    assert ids(status=None) == {old.id, clip.id, retro.id, other.id}
    assert ids(status=ReviewStatus.DISMISSED) == {other.id}
    assert ids(bank="first") == {old.id, clip.id}
    assert ids(bank="nobody") == set()
    assert ids(signal=SignalType.CLIP) == {clip.id}
    assert ids(since=T0 + timedelta(days=1)) == {retro.id}
    assert ids(until=T0 + timedelta(days=1)) == {old.id, clip.id}
    assert ids(retroactive=True) == {retro.id}
    assert ids(retroactive=False) == {old.id, clip.id}
    assert ids(upload_id=upload.id, status=None) == {old.id, clip.id, retro.id}
    assert service.count(session, QueueFilter(bank="first")) == 2


def test_evidence_names_the_threshold_that_applies(session: Session) -> None:
    settings = TEST_SETTINGS
    own, default = make_bank(session, "own", radius=0.08), make_bank(session, "default")
    upload = make_upload(session, external_id="ext-9")
    by_bank = make_hit(
        session, upload, make_entry(session, own), signal=SignalType.CLIP, distance=0.07
    )
    by_default = make_hit(
        session, upload, make_entry(session, default), signal=SignalType.CLIP, distance=0.02
    )
    pdq = make_hit(session, upload, make_entry(session, default), signal=SignalType.PDQ)
    exact = make_hit(session, upload, make_entry(session, default))
    evidence = {hit.hit_id: hit for hit in service.upload_hits(session, TEST_SETTINGS, upload.id)}
    assert (evidence[by_bank.id].threshold, evidence[by_bank.id].threshold_source) == (
        0.08,
        "bank",
    )
    assert evidence[by_default.id].threshold == settings.match_radius
    assert evidence[by_default.id].threshold_source == "global"
    assert evidence[pdq.id].threshold == settings.pdq_threshold
    assert evidence[exact.id].threshold_source == "exact"
    assert evidence[by_bank.id].bank == "own"
    assert evidence[by_bank.id].external_id == "ext-9"
    assert service.get_hit(session, TEST_SETTINGS, pdq.id) == evidence[pdq.id]
    with pytest.raises(service.HitNotFound):
        service.get_hit(session, TEST_SETTINGS, 10**12)


def test_evidence_shows_the_threshold_recorded_when_the_hit_was_found(session: Session) -> None:
    bank = make_bank(session, "narrowed", radius=0.08)
    upload = make_upload(session)
    found_wide = make_hit(
        session,
        upload,
        make_entry(session, bank),
        signal=SignalType.CLIP,
        distance=0.07,
        threshold=0.08,
    )
    # The bank's radius is narrowed afterwards: the hit was still held to 0.08, not 0.03.
    banks.update_bank(session, bank, actor="test", radius=0.03)
    evidence = service.get_hit(session, TEST_SETTINGS, found_wide.id)
    assert (evidence.threshold, evidence.threshold_source) == (0.08, "recorded")


def test_a_decision_decides_the_uploads_open_hits_together_and_is_audited(
    session: Session,
) -> None:
    bank = make_bank(session, "b")
    upload = make_upload(session)
    named, sibling, escalated, dismissed = (
        make_hit(session, upload, make_entry(session, bank)) for _ in range(4)
    )
    unrelated = make_hit(session, make_upload(session), make_entry(session, bank))
    service.decide(
        session, TEST_SETTINGS, escalated.id, Outcome.ESCALATE, "ask a senior", "key:1:alice"
    )
    # Escalating decided the upload's every open hit; make one dismissed by hand to see
    # that a final decision is left alone.
    dismissed.review_status = ReviewStatus.DISMISSED
    sibling.review_status = ReviewStatus.PENDING
    session.flush()

    decision = service.decide(
        session, TEST_SETTINGS, named.id, Outcome.CONFIRM, "matches", "key:2:bob"
    )
    assert decision.changed
    assert decision.decided == {
        named.id: ReviewStatus.ESCALATED,
        sibling.id: ReviewStatus.PENDING,
        escalated.id: ReviewStatus.ESCALATED,
    }
    statuses = {hit.hit_id: hit.review_status for hit in decision.hits}
    assert statuses == {
        named.id: "confirmed",
        sibling.id: "confirmed",
        escalated.id: "confirmed",
        dismissed.id: "dismissed",
    }
    for hit in (named, sibling, escalated):
        session.refresh(hit)
        assert hit.reviewed_by == "key:2:bob"
        assert hit.review_note == "matches"
        assert hit.reviewed_at is not None
    session.refresh(unrelated)
    assert unrelated.review_status is ReviewStatus.PENDING

    rows = list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.subject_type == "upload", AuditEvent.subject_id == str(upload.id))
            .order_by(AuditEvent.id)
        )
    )
    assert [(row.actor, row.action) for row in rows] == [
        ("key:1:alice", "review.decide"),
        ("key:2:bob", "review.decide"),
    ]
    escalation = rows[0].after
    assert escalation is not None
    assert rows[1].before is not None
    # What the confirmation overwrote of Alice's escalation, for an undo to put back.
    earlier = rows[1].before.pop("reviews")
    assert {str(named.id), str(escalated.id)} <= earlier.keys()
    assert {review["by"] for review in earlier.values()} == {"key:1:alice"}
    assert {review["note"] for review in earlier.values()} == {"ask a senior"}
    assert rows[1].before == {
        "hits": {
            str(named.id): "escalated",
            str(sibling.id): "pending",
            str(escalated.id): "escalated",
        }
    }
    assert rows[1].after == {
        "hit_id": named.id,
        "outcome": "confirm",
        "note": "matches",
        "hits": {str(i): "confirmed" for i in (named.id, sibling.id, escalated.id)},
    }
    assert rows[1].created_at is not None


def test_repeating_a_decision_changes_nothing_and_contradicting_it_is_refused(
    session: Session,
) -> None:
    bank = make_bank(session, "b")
    hit = make_hit(session, make_upload(session), make_entry(session, bank))
    service.decide(session, TEST_SETTINGS, hit.id, "dismiss", None, "key:1:alice")
    audited = session.scalar(select(func.count()).select_from(AuditEvent))
    again = service.decide(session, TEST_SETTINGS, hit.id, Outcome.DISMISS, "again", "key:2:bob")
    assert not again.changed
    assert again.decided == {}
    assert session.scalar(select(func.count()).select_from(AuditEvent)) == audited
    session.refresh(hit)
    assert hit.reviewed_by == "key:1:alice"
    with pytest.raises(AlreadyDecided, match=r"already dismissed by key:1:alice"):
        service.decide(session, TEST_SETTINGS, hit.id, Outcome.CONFIRM, None, "key:2:bob")
    with pytest.raises(service.HitNotFound):
        service.decide(session, TEST_SETTINGS, 10**12, Outcome.CONFIRM, None, "key:2:bob")


def test_a_confirmation_writes_its_webhook_event_in_its_transaction(session: Session) -> None:
    bank = make_bank(session, "b")
    upload = make_upload(session, external_id="ext-1")
    first, second = (make_hit(session, upload, make_entry(session, bank)) for _ in range(2))
    service.decide(
        session, WEBHOOKS_ON, first.id, Outcome.DISMISS, None, "t"
    )  # no event: not configured
    upload = make_upload(session, external_id="ext-2")
    first, second = (make_hit(session, upload, make_entry(session, bank)) for _ in range(2))
    nested = session.begin_nested()
    service.decide(session, WEBHOOKS_ON, first.id, Outcome.CONFIRM, None, "t")
    nested.rollback()
    assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 0
    service.decide(session, WEBHOOKS_ON, first.id, Outcome.CONFIRM, "not sent", "t")
    (event,) = session.scalars(select(WebhookEvent))
    assert event.event_type is EventType.CONFIRMED
    assert event.upload_id == upload.id
    assert event.payload["upload"] == {"id": upload.id, "external_id": "ext-2", "uri": upload.uri}
    assert [hit["id"] for hit in event.payload["hits"]] == [first.id, second.id]
    assert {hit["review_status"] for hit in event.payload["hits"]} == {"confirmed"}
    assert event.payload["hits"][0]["bank"] == "b"
    assert event.payload["decision"]["outcome"] == "confirm"
    assert "note" not in event.payload["decision"]


def test_two_reviewers_deciding_at_once_are_ordered(clean_db: None) -> None:
    """The second waits on the first's row locks, then sees its decision."""
    with TEST_RUNTIME.session() as session:
        bank = make_bank(session, "b")
        upload = make_upload(session)
        first, second = (make_hit(session, upload, make_entry(session, bank)) for _ in range(2))
        first_id, second_id = first.id, second.id
    outcome: dict[str, object] = {}

    def contradict() -> None:
        try:
            with TEST_RUNTIME.session() as other:
                outcome["pid"] = _backend_pid(other)
                service.decide(other, TEST_SETTINGS, second_id, Outcome.DISMISS, None, "key:2:bob")
            outcome["bob"] = "decided"
        except AlreadyDecided as error:
            outcome["bob"] = error

    with TEST_RUNTIME.session() as session:
        service.decide(session, TEST_SETTINGS, first_id, Outcome.CONFIRM, None, "key:1:alice")
        bob = threading.Thread(target=contradict)
        bob.start()
        _wait_for_a_lock_wait(outcome)
        assert "bob" not in outcome
    bob.join(timeout=30)
    assert isinstance(outcome["bob"], AlreadyDecided)
    assert outcome["bob"].decided is ReviewStatus.CONFIRMED
    with TEST_RUNTIME.session() as session:
        statuses = set(session.scalars(select(Hit.review_status)))
    assert statuses == {ReviewStatus.CONFIRMED}


def _backend_pid(session: Session) -> int:
    """The session's PostgreSQL backend, without a query (which would change the timing)."""
    dbapi = session.connection().connection.dbapi_connection
    pid: int = dbapi.info.backend_pid  # type: ignore[union-attr]
    return pid


def _wait_for_a_lock_wait(outcome: dict[str, object]) -> None:
    """Until the second decider's connection waits for a lock."""
    deadline = time.monotonic() + 30
    with TEST_RUNTIME.engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = (
                "pid" in outcome
                and conn.execute(
                    text("SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted"),
                    {"pid": outcome["pid"]},
                ).scalar()
            )
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("the second decision never waited for the first")
