"""The golden set: analysts' queries and relevant uploads, and the pairs review implies.

A confirmed hit says "this bank entry's source and this upload are the same content", so
the entry becomes an image query and the upload a result it must find. `sync_from_review`
brings the set up to date with the decisions (adding what was confirmed, removing what is
no longer); every run calls it first, so the set follows review without review's code
knowing about it. Services take a session and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, delete, exists, literal, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from moderation.audit.service import record
from moderation.errors import Invalid, NotFound
from moderation.evaluation.models import GoldenOrigin, GoldenQuery, GoldenRelevant, Modality
from moderation.review.models import Hit, ReviewStatus
from moderation.screening.models import Upload

REVIEW_ACTOR = "review"


class BadGoldenQuery(Invalid):
    code = "bad_golden_query"


class GoldenUploadNotFound(NotFound):
    code = "golden_upload_not_found"


class GoldenQueryNotFound(NotFound):
    code = "golden_query_not_found"


@dataclass(frozen=True)
class QuerySubject:
    """What a golden query is: exactly one of these."""

    text: str | None = None
    image_uri: str | None = None
    upload_id: int | None = None

    def check(self) -> None:
        given = [v for v in (self.text, self.image_uri, self.upload_id) if v is not None]
        if len(given) != 1:
            raise BadGoldenQuery("a golden query is exactly one of a text, an image or an upload")
        if self.text is not None and not self.text.strip():
            raise BadGoldenQuery("the text of a golden query is empty")

    @property
    def modality(self) -> Modality:
        return Modality.TEXT if self.text is not None else Modality.IMAGE


def add_query(
    session: Session,
    subject: QuerySubject,
    relevant: Sequence[int],
    *,
    actor: str,
    note: str | None = None,
) -> GoldenQuery:
    """A golden query (the existing one, when the same text, image or upload is already
    one, its note replaced by a new one) with these uploads added to its relevant set;
    audited."""
    subject.check()
    if not relevant:
        raise BadGoldenQuery("a golden query needs at least one relevant upload")
    wanted = {*relevant, *([subject.upload_id] if subject.upload_id is not None else [])}
    known = set(session.scalars(select(Upload.id).where(Upload.id.in_(wanted))))
    if missing := sorted(wanted - known):
        raise GoldenUploadNotFound(f"no upload with id {', '.join(map(str, missing))}")
    if subject.upload_id is not None and subject.upload_id in relevant:
        raise BadGoldenQuery(
            "an upload cannot be relevant to itself: it is left out of its results"
        )
    values = {
        "modality": subject.modality,
        "origin": GoldenOrigin.ANALYST,
        "text": subject.text,
        "image_uri": subject.image_uri,
        "upload_id": subject.upload_id,
        "created_by": actor,
        "note": note,
    }
    query_id = session.scalar(
        insert(GoldenQuery).values(values).on_conflict_do_nothing().returning(GoldenQuery.id)
    )
    if query_id is None:  # already a golden query
        query_id = session.scalar(select(GoldenQuery.id).where(_same_subject(subject)))
        assert query_id is not None
        if note is not None:  # the latest word on why these are relevant
            session.execute(update(GoldenQuery).where(GoldenQuery.id == query_id).values(note=note))
    added = session.scalars(
        insert(GoldenRelevant)
        .values(
            [
                {
                    "query_id": query_id,
                    "upload_id": upload_id,
                    "origin": GoldenOrigin.ANALYST,
                    "added_by": actor,
                }
                for upload_id in sorted(set(relevant))
            ]
        )
        .on_conflict_do_nothing()
        .returning(GoldenRelevant.upload_id)
    ).all()
    record(
        session,
        actor=actor,
        action="golden.add",
        subject_type="golden_query",
        subject_id=query_id,
        after={"modality": subject.modality.value, "relevant_added": sorted(added)},
    )
    return session.get_one(GoldenQuery, query_id)


def _same_subject(subject: QuerySubject) -> ColumnElement[bool]:
    if subject.text is not None:
        return GoldenQuery.text == subject.text
    if subject.image_uri is not None:
        return GoldenQuery.image_uri == subject.image_uri
    return GoldenQuery.upload_id == subject.upload_id


def remove_query(session: Session, query_id: int, *, actor: str) -> None:
    removed = session.execute(
        delete(GoldenQuery).where(GoldenQuery.id == query_id).returning(GoldenQuery.id)
    ).first()
    if removed is None:
        raise GoldenQueryNotFound(f"no golden query with id {query_id}")
    record(
        session,
        actor=actor,
        action="golden.remove",
        subject_type="golden_query",
        subject_id=query_id,
    )


@dataclass(frozen=True)
class ReviewSync:
    queries_added: int
    pairs_added: int
    pairs_removed: int


def sync_from_review(session: Session) -> ReviewSync:
    """Every confirmed hit's entry a query, its upload relevant to it; review-derived pairs
    whose hits are no longer confirmed removed (analysts' pairs are never touched)."""
    confirmed = select(Hit.bank_entry_id, Hit.upload_id).where(
        Hit.review_status == ReviewStatus.CONFIRMED
    )
    queries_added = session.scalars(
        insert(GoldenQuery)
        .from_select(
            ["modality", "origin", "bank_entry_id", "created_by"],
            select(
                literal(Modality.IMAGE, GoldenQuery.modality.type),
                literal(GoldenOrigin.REVIEW, GoldenQuery.origin.type),
                Hit.bank_entry_id,
                literal(REVIEW_ACTOR),
            )
            .where(Hit.review_status == ReviewStatus.CONFIRMED)
            .distinct(),
        )
        .on_conflict_do_nothing()
        .returning(GoldenQuery.id)
    ).all()
    pairs = confirmed.subquery()
    pairs_added = session.scalars(
        insert(GoldenRelevant)
        .from_select(
            ["query_id", "upload_id", "origin", "added_by"],
            select(
                GoldenQuery.id,
                pairs.c.upload_id,
                literal(GoldenOrigin.REVIEW, GoldenRelevant.origin.type),
                literal(REVIEW_ACTOR),
            )
            .join(GoldenQuery, GoldenQuery.bank_entry_id == pairs.c.bank_entry_id)
            .distinct(),
        )
        .on_conflict_do_nothing()
        .returning(GoldenRelevant.upload_id)
    ).all()
    still_confirmed = exists().where(
        and_(
            Hit.review_status == ReviewStatus.CONFIRMED,
            Hit.upload_id == GoldenRelevant.upload_id,
            Hit.bank_entry_id == GoldenQuery.bank_entry_id,
        )
    )
    pairs_removed = session.scalars(
        delete(GoldenRelevant)
        .where(
            GoldenRelevant.origin == GoldenOrigin.REVIEW,
            GoldenRelevant.query_id == GoldenQuery.id,
            ~still_confirmed,
        )
        .returning(GoldenRelevant.upload_id)
    ).all()
    return ReviewSync(len(queries_added), len(pairs_added), len(pairs_removed))


@dataclass(frozen=True)
class GoldenView:
    id: int
    modality: str
    origin: str
    subject: str  # the text, the image URI, "upload N" or "bank entry N"
    relevant: list[int]
    created_by: str
    note: str | None


def describe(query: GoldenQuery) -> str:
    if query.text is not None:
        return query.text
    if query.image_uri is not None:
        return query.image_uri
    if query.upload_id is not None:
        return f"upload {query.upload_id}"
    return f"bank entry {query.bank_entry_id}"


def list_queries(
    session: Session, modality: Modality | None = None, *, query_id: int | None = None
) -> list[GoldenView]:
    statement = select(GoldenQuery).order_by(GoldenQuery.id)
    if modality is not None:
        statement = statement.where(GoldenQuery.modality == modality)
    if query_id is not None:
        statement = statement.where(GoldenQuery.id == query_id)
    queries = list(session.scalars(statement))
    relevant: dict[int, list[int]] = {}
    for query_id, upload_id in session.execute(
        select(GoldenRelevant.query_id, GoldenRelevant.upload_id)
        .where(GoldenRelevant.query_id.in_([q.id for q in queries]))
        .order_by(GoldenRelevant.query_id, GoldenRelevant.upload_id)
    ):
        relevant.setdefault(query_id, []).append(upload_id)
    return [
        GoldenView(
            id=q.id,
            modality=q.modality.value,
            origin=q.origin.value,
            subject=describe(q),
            relevant=relevant.get(q.id, []),
            created_by=q.created_by,
            note=q.note,
        )
        for q in queries
    ]
