"""Accepting uploads: the one path from a producer's events to queued, announced uploads.

`moderation submit` and `POST /v1/uploads` both take these steps (`accept`; `submit` checks
every URI first, then records them in chunks through `record_and_announce`):

1. every URI is checked against the fetch policy (`images.uri_policy`) before anything is
   recorded; one refused URI refuses the whole call, and nothing is fetched;
2. the events are recorded as queued uploads in one transaction (`service.submit_uploads`:
   idempotent on the external id), which commits;
3. only then are screening messages published, for the uploads this call created (the
   API hands them to a thread that sends them: `screening.announcer`).

PostgreSQL is the source of truth and Redis the transport: if publishing fails after the
commit, the uploads stay queued and the sweeper sends them (`moderation.worker.recovery`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from moderation.errors import Invalid
from moderation.images.errors import IntakeError
from moderation.images.uri_policy import UriPolicy
from moderation.runtime import Runtime
from moderation.screening import service
from moderation.screening.service import NewUpload, Submitted

# A refused URI is named by its index; its text is quoted up to this many characters (a
# batch of 1000 refused 8 KB URIs would otherwise be echoed back whole).
URI_EXCERPT_CHARS = 200


def _excerpt(uri: str) -> str:
    return uri if len(uri) <= URI_EXCERPT_CHARS else f"{uri[:URI_EXCERPT_CHARS]}…"


@dataclass(frozen=True)
class RefusedUri:
    # The event's position in the call.
    index: int
    uri: str
    error: IntakeError


class UrisRefused(Invalid):
    """Some URIs are outside what the service may fetch; nothing was recorded."""

    code = "uri_refused"

    def __init__(self, refused: list[RefusedUri], total: int) -> None:
        first = refused[0]
        more = f" ({len(refused)} of {total} URIs refused; the first is shown)" if total > 1 else ""
        super().__init__(
            f"{first.error}{more}; nothing was submitted",
            refused=[
                {
                    "index": r.index,
                    "uri": _excerpt(r.uri),
                    "code": r.error.code,
                    "rule": r.error.message,
                }
                for r in refused
            ],
        )
        self.refused = refused


def check_uris(uploads: Sequence[NewUpload], policy: UriPolicy) -> list[NewUpload]:
    """The events with their URIs in canonical form, or `UrisRefused` naming every refused
    one. Workers check again when they fetch (a host's addresses can change in between)."""
    verdicts = policy.check_all([upload.uri for upload in uploads])
    refused = [
        RefusedUri(index, upload.uri, verdict)
        for index, (upload, verdict) in enumerate(zip(uploads, verdicts, strict=True))
        if isinstance(verdict, IntakeError)
    ]
    if refused:
        raise UrisRefused(refused, len(uploads))
    return [
        upload if upload.uri == verdict else replace(upload, uri=verdict)
        for upload, verdict in zip(uploads, verdicts, strict=True)
        if isinstance(verdict, str)
    ]


def accept(
    runtime: Runtime,
    uploads: Sequence[NewUpload],
    *,
    policy: UriPolicy | None = None,
    queue: str | None = None,
    announce: Callable[[list[int], str], None] | None = None,
) -> list[Submitted]:
    """Check, record and announce upload events, all or none, on `runtime` (its URI
    policy, database and queue unless told otherwise); their uploads, in order.

    `announce(ids, queue)` sends the screening messages once the rows are committed;
    by default they are published here with the runtime's producer, before returning
    (`moderation submit`). The API hands them to its `Announcer` instead, and answers
    without waiting for Redis.

    Raises `UrisRefused` (nothing recorded) and `service.ExternalIdConflict` (nothing
    recorded: the transaction rolls back).
    """
    checked = check_uris(uploads, policy or UriPolicy.from_settings(runtime.settings))
    return record_and_announce(runtime, checked, queue=queue, announce=announce)


def record_and_announce(
    runtime: Runtime,
    checked: Sequence[NewUpload],
    *,
    queue: str | None = None,
    announce: Callable[[list[int], str], None] | None = None,
) -> list[Submitted]:
    """Steps 2 and 3 of `accept`, for events whose URIs `check_uris` has already checked
    (and put in canonical form): a caller that checks a large submission once, before
    recording it in chunks, does not resolve every host twice."""
    with runtime.session() as session:
        submitted = service.submit_uploads(session, checked)
    created = [s.upload_id for s in submitted if s.created]
    if created:
        (announce or runtime.producer.send_screening)(created, queue or runtime.settings.queue)
    return submitted
