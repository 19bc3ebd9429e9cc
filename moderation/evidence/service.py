"""Keeping, reading and deleting evidence.

Screening keeps it: the worker renders each hashed frame of every upload it screens
(`ImageSignals` frames' `thumbnail`) and, for an upload with hits, seals them into the
vault before recording its results (`keep_screened`), then records the row in the same
transaction as the hits (`record_kept`). A hit found later, by a retro-hunt, has no bytes
at hand: a worker's sweeper fetches the URI again and keeps what it serves only if its
SHA-256 is the one screened; otherwise it records that the content changed (`capture`).
Nobody's view ever fetches: reviewers see kept frames or the reason there are none.

Every read of a kept frame or report is audited (`read_frame`, `read_report`), blurred or
not. The sweepers delete frames past their retention unless the upload is under legal hold
(`purge_expired`); an escalation holds its upload (`hold`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.errors import NotFound
from moderation.evidence.models import Evidence, EvidenceSource, EvidenceState
from moderation.evidence.storage import EvidenceStore
from moderation.evidence.vault import Vault, frame_name, report_name
from moderation.images.signals import ImageSignals, SignalType
from moderation.screening.models import Signal, Upload


class EvidenceNotKept(NotFound):
    code = "evidence_not_kept"


@dataclass(frozen=True)
class Kept:
    """What was sealed into the vault for one upload, to record with its results."""

    upload_id: int
    sha256: bytes
    frames: list[int]
    frame_count: int
    source: EvidenceSource
    detail: str | None = None


def keep_screened(
    vault: Vault, upload_id: int, signals: ImageSignals, report: dict[str, Any]
) -> Kept:
    """Seal the frames screening rendered, and the report, into the vault (no database).
    Raises `StoreUnavailable` (a transient fault for the caller: nothing is recorded)."""
    frames = [frame for frame in signals.frames if frame.thumbnail is not None]
    for frame in frames:
        assert frame.thumbnail is not None
        vault.put(frame_name(upload_id, signals.sha256, frame.index), frame.thumbnail)
    vault.put(
        report_name(upload_id, signals.sha256),
        json.dumps(report, sort_keys=True, default=str).encode(),
    )
    return Kept(
        upload_id=upload_id,
        sha256=signals.sha256,
        frames=[frame.index for frame in frames],
        frame_count=signals.frame_count,
        source=EvidenceSource.SCREENING,
    )


def screening_report(
    upload_id: int, uri: str, signals: ImageSignals, matches: Sequence[Any], **facts: Any
) -> dict[str, Any]:
    """What a report on the upload needs that only screening saw: the bytes' hashes,
    format and frames, and each match (`banks.matcher.Match`) as found."""
    return {
        "upload_id": upload_id,
        "uri": uri,
        "sha256": signals.sha256.hex(),
        "format": signals.format,
        "width": signals.width,
        "height": signals.height,
        "frame_count": signals.frame_count,
        "frame_count_exact": signals.frame_count_exact,
        "frames": [
            {"index": f.index, "pdq": f.pdq.hex, "pdq_quality": f.pdq.quality}
            for f in signals.frames
        ],
        "matches": [
            {
                "bank_entry_id": m.bank_entry_id,
                "signal": m.signal.value,
                "distance": m.distance,
                "threshold": m.threshold,
                "frame_index": m.frame_index,
            }
            for m in matches
        ],
        **facts,
    }


def record_kept(session: Session, kept: Sequence[Kept], retention: timedelta) -> None:
    """Record evidence sealed at screening, in the transaction of the upload's results; an
    upload's evidence is recorded once (a redelivery writes the same blobs, nothing here)."""
    if not kept:
        return
    now = func.now()
    session.execute(
        insert(Evidence)
        .values(
            [
                {
                    "upload_id": k.upload_id,
                    "state": EvidenceState.PRESERVED,
                    "source": k.source,
                    "screened_sha256": k.sha256,
                    "frames": k.frames,
                    "frame_count": k.frame_count,
                    "detail": k.detail,
                    "captured_at": now,
                    "expires_at": now + retention,
                }
                for k in kept
            ]
        )
        .on_conflict_do_nothing(index_elements=[Evidence.upload_id])
    )


# Fetching again, for hits found after screening.


@dataclass(frozen=True)
class Capture:
    """An upload a sweeper has taken to fetch again."""

    upload_id: int
    uri: str
    screened_sha256: bytes


def start_captures(
    session: Session, upload_ids: Sequence[int], *, stale_after: timedelta
) -> list[Capture]:
    """Take these uploads (screened, with no evidence yet) for a capture: a row in state
    `capturing`, or one whose capture was taken longer than `stale_after` ago (its sweeper
    died). Uploads another sweeper holds are left to it."""
    if not upload_ids:
        return []
    screened = select(Signal.upload_id, Signal.value).where(
        Signal.upload_id.in_(upload_ids),
        Signal.signal == SignalType.SHA256,
        Signal.frame_index == 0,
    )
    rows = [
        {
            "upload_id": upload_id,
            "state": EvidenceState.CAPTURING,
            "source": EvidenceSource.REFETCH,
            "screened_sha256": sha,
            "attempts": 1,
        }
        for upload_id, sha in session.execute(screened)
    ]
    if not rows:
        return []
    statement = insert(Evidence).values(rows)
    taken = session.scalars(
        statement.on_conflict_do_update(
            index_elements=[Evidence.upload_id],
            set_={"attempts": Evidence.attempts + 1, "captured_at": func.now()},
            where=(Evidence.state == EvidenceState.CAPTURING)
            & (Evidence.captured_at < func.now() - stale_after),
        ).returning(Evidence.upload_id)
    ).all()
    found = session.execute(
        select(Upload.id, Upload.uri, Evidence.screened_sha256)
        .join(Evidence, Evidence.upload_id == Upload.id)
        .where(Upload.id.in_(taken))
    )
    return [Capture(upload_id, uri, sha) for upload_id, uri, sha in found]


@dataclass(frozen=True)
class CaptureOutcome:
    upload_id: int
    state: EvidenceState
    kept: Kept | None = None
    observed_sha256: bytes | None = None
    detail: str | None = None
    frame_count: int | None = None
    # Transient: leave the row capturing, to be taken again once stale.
    retry: bool = False
    frames: list[int] = field(default_factory=list)


def finish_capture(session: Session, outcome: CaptureOutcome, retention: timedelta) -> None:
    if outcome.retry:
        return
    values: dict[str, Any] = {
        "state": outcome.state,
        "detail": outcome.detail,
        "observed_sha256": outcome.observed_sha256,
        "captured_at": func.now(),
        "expires_at": func.now() + retention,
    }
    if outcome.kept is not None:
        values.update(frames=outcome.kept.frames, frame_count=outcome.kept.frame_count)
    session.execute(
        update(Evidence)
        .where(Evidence.upload_id == outcome.upload_id, Evidence.state == EvidenceState.CAPTURING)
        .values(**values)
    )


# Reading, audited.


def evidence_of(session: Session, upload_id: int) -> Evidence | None:
    return session.get(Evidence, upload_id)


def evidence_for(session: Session, upload_ids: Sequence[int]) -> dict[int, Evidence]:
    rows = session.scalars(select(Evidence).where(Evidence.upload_id.in_(upload_ids)))
    return {row.upload_id: row for row in rows}


def _kept(session: Session, upload_id: int) -> Evidence:
    row = session.get(Evidence, upload_id)
    if row is None or row.state is not EvidenceState.PRESERVED:
        state = "none" if row is None else row.state.value
        raise EvidenceNotKept(f"upload {upload_id} has no kept evidence ({state})")
    return row


def read_frames(
    session: Session,
    vault: Vault,
    upload_id: int,
    frames: Sequence[int],
    *,
    actor: str,
    purpose: str,
) -> list[bytes]:
    """Kept frames' JPEGs, opened; one audit row for the read, naming the frames and why
    (`blurred`, `revealed`, `strip`, `export`)."""
    row = _kept(session, upload_id)
    missing = [frame for frame in frames if frame not in row.frames]
    if missing:
        raise EvidenceNotKept(f"upload {upload_id} has no kept frame {missing[0]}")
    audit.record(
        session,
        actor=actor,
        action="evidence.read",
        subject_type="upload",
        subject_id=upload_id,
        after={"frames": list(frames), "purpose": purpose},
    )
    opened = []
    for frame in frames:
        data = vault.get(frame_name(upload_id, row.screened_sha256, frame))
        if data is None:
            raise EvidenceNotKept(f"upload {upload_id}'s frame {frame} is missing from the store")
        opened.append(data)
    return opened


def read_report(session: Session, vault: Vault, upload_id: int, *, actor: str) -> dict[str, Any]:
    row = _kept(session, upload_id)
    audit.record(
        session,
        actor=actor,
        action="evidence.read",
        subject_type="upload",
        subject_id=upload_id,
        after={"report": True, "purpose": "export"},
    )
    data = vault.get(report_name(upload_id, row.screened_sha256))
    if data is None:
        raise EvidenceNotKept(f"upload {upload_id}'s report is missing from the store")
    report: dict[str, Any] = json.loads(data)
    return report


# Retention and legal hold.


def hold(session: Session, upload_id: int, *, actor: str, reason: str) -> bool:
    """Put an upload's evidence under legal hold (kept past its retention); audited.
    False when it has none or it is already held."""
    held = session.scalar(
        update(Evidence)
        .where(Evidence.upload_id == upload_id, Evidence.legal_hold.is_(False))
        .values(legal_hold=True, held_by=actor)
        .returning(Evidence.upload_id)
    )
    if held is None:
        return False
    audit.record(
        session,
        actor=actor,
        action="evidence.hold",
        subject_type="upload",
        subject_id=upload_id,
        after={"legal_hold": True, "reason": reason},
    )
    return True


def release(session: Session, upload_id: int, *, actor: str) -> bool:
    released = session.scalar(
        update(Evidence)
        .where(Evidence.upload_id == upload_id, Evidence.legal_hold.is_(True))
        .values(legal_hold=False, held_by=None)
        .returning(Evidence.upload_id)
    )
    if released is None:
        return False
    audit.record(
        session,
        actor=actor,
        action="evidence.release",
        subject_type="upload",
        subject_id=upload_id,
        before={"legal_hold": True},
        after={"legal_hold": False},
    )
    return True


def purge_expired(
    session: Session,
    store: EvidenceStore,
    *,
    limit: int | None = 100,
    now: datetime | None = None,
) -> int:
    """Delete the frames of evidence past its retention and not held; the row stays, as
    `expired`, so a reviewer is told why there is nothing to see. Rows another sweeper is
    purging are skipped."""
    due = (
        select(Evidence)
        .where(
            Evidence.expires_at < (now or func.now()),
            Evidence.legal_hold.is_(False),
            Evidence.state == EvidenceState.PRESERVED,
        )
        .order_by(Evidence.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    purged = 0
    for row in session.scalars(due):
        for frame in row.frames:
            store.delete(frame_name(row.upload_id, row.screened_sha256, frame))
        store.delete(report_name(row.upload_id, row.screened_sha256))
        row.state = EvidenceState.EXPIRED
        row.frames = []
        row.deleted_at = func.now()
        purged += 1
    session.flush()
    return purged
