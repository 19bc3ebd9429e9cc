"""Banks over HTTP: admins change them, reviewers and analysts read them.

Every change is audited in its own transaction (`banks.service`). Entries go in through
`service.add_entries`, the same as `moderation bank add`; an image is turned into an entry
by `service.entry_from_image`, as screening computes signals, and its bytes are not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import (
    APIRouter,
    File,
    Form,
    HTTPException,
    Path,
    Query,
    Request,
    UploadFile,
    status,
)
from pydantic import BaseModel, ConfigDict, Field

from moderation.auth.models import Role
from moderation.banks import service
from moderation.banks.hash_list import parse_pdq_list
from moderation.banks.models import Bank, BankEntry
from moderation.config import Settings
from moderation.embedding import registry
from moderation.embedding.models import EmbeddingModel
from moderation.embedding.service import get_or_create_model, model_dim, normalise
from moderation.http.access import AppRuntime, Caller, DbSession, allow, app_runtime
from moderation.http.admission import FORM_FRAMING_BYTES, body_up_to, image_body
from moderation.http.resources import ProcessResource
from moderation.images.decode import DecodeLimits
from moderation.images.hashing import PdqHash, parse_hex

if TYPE_CHECKING:
    from moderation.embedding.embedder import Embedder


class Embedders:
    """The models this API process embeds image entries with, by name, each loaded on
    the first image that needs it (the last two kept); one image embedded at a time."""

    KEPT = 2

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loaded: OrderedDict[str, Embedder] = OrderedDict()
        # Held while a model loads and while an image is embedded.
        self.lock = threading.Lock()

    def get(self, name: str) -> Embedder:
        """The model called `name`; the caller holds `lock`."""
        from moderation.embedding.families import open_embedder

        embedder = self._loaded.get(name)
        if embedder is None:
            embedder = self._loaded[name] = open_embedder(name, self._settings.resolved_device())
            while len(self._loaded) > self.KEPT:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(name)
        return embedder

    def close(self) -> None:
        self._loaded.clear()


EMBEDDERS = ProcessResource(
    "bank_embedders", lambda request: Embedders(app_runtime(request).settings)
)

router = APIRouter(prefix="/v1/banks", tags=["banks"], lifespan=EMBEDDERS.lifespan())

READERS = allow(Role.REVIEWER, Role.ANALYST)
ADMINS = allow()
# Entries per JSON request, and lines per imported hash list (entries are added one ORM
# object each; `moderation bank` with COPY is for millions).
MAX_ENTRIES = 1000
MAX_IMPORT_LINES = 100_000
MAX_IMPORT_BYTES = 16 * 1024 * 1024
MAX_ID = 2**63 - 1

BankName = Annotated[
    str, Path(min_length=1, max_length=service.MAX_BANK_NAME, pattern=service.BANK_NAME_PATTERN)
]
EntryId = Annotated[int, Path(ge=1, le=MAX_ID)]


class BankIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, max_length=service.MAX_BANK_NAME, pattern=service.BANK_NAME_PATTERN
    )
    radius: float | None = Field(
        default=None, ge=0, le=2, description="CLIP cosine distance; null: the global radius."
    )


class BankChange(BaseModel):
    """Only the fields given change; `radius: null` returns the bank to the global radius."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    radius: float | None = Field(default=None, ge=0, le=2)


class BankOut(BaseModel):
    id: int
    name: str
    radius: float | None
    enabled: bool
    entries: int
    clip_entries: dict[str, int]


class BankList(BaseModel):
    banks: list[BankOut]


class EntryIn(BaseModel):
    """One known-bad item by its signals; at least one of them."""

    model_config = ConfigDict(extra="forbid")

    sha256: str | None = Field(default=None, pattern="^[0-9a-fA-F]{64}$")
    pdq: str | None = Field(default=None, pattern="^[0-9a-fA-F]{64}$")
    pdq_quality: int | None = Field(default=None, ge=0, le=100)
    embedding: list[float] | None = Field(
        default=None,
        min_length=1,
        max_length=8192,
        description="From the configured model (MODERATION_MODEL); normalised on the way in.",
    )
    source_ref: str | None = Field(default=None, max_length=2000, pattern=r"^[^\x00]*$")


class EntriesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entries: list[EntryIn] = Field(min_length=1, max_length=MAX_ENTRIES)


class EntryOut(BaseModel):
    id: int
    sha256: str | None
    pdq: str | None
    pdq_quality: int | None
    # Model ids this entry has an embedding for.
    embedding_models: list[int]
    # Whether the entry names where its source lives. The reference itself is never
    # served: it points into restricted storage, which only re-embedding jobs read.
    has_source_ref: bool
    added_by: str
    created_at: datetime

    @classmethod
    def of(cls, entry: BankEntry) -> EntryOut:
        return cls(
            id=entry.id,
            sha256=entry.sha256.hex() if entry.sha256 else None,
            pdq=entry.pdq.hex() if entry.pdq else None,
            pdq_quality=entry.pdq_quality,
            embedding_models=sorted(e.model_id for e in entry.embeddings),
            has_source_ref=entry.source_ref is not None,
            added_by=entry.added_by,
            created_at=entry.created_at,
        )


class EntryPage(BaseModel):
    entries: list[EntryOut]
    # Pass as `after_id` for the next page; null when this page is the last.
    next_after_id: int | None


class EntriesAdded(BaseModel):
    entries: list[EntryOut]


class RejectedLine(BaseModel):
    line: int
    reason: str


class ImportReport(BaseModel):
    added: int
    # Hashes already in the bank, or repeated in the list: not added again.
    duplicates: int
    rejected: list[RejectedLine]
    dry_run: bool


def _summary(session: DbSession, bank: Bank) -> BankOut:
    summary = next(b for b in service.list_banks(session) if b.id == bank.id)
    return BankOut(**vars(summary))


@router.get("", openapi_extra=READERS)
def list_banks(session: DbSession) -> BankList:
    return BankList(banks=[BankOut(**vars(b)) for b in service.list_banks(session)])


@router.post("", status_code=status.HTTP_201_CREATED, openapi_extra=ADMINS)
def create_bank(session: DbSession, caller: Caller, body: BankIn) -> BankOut:
    bank = service.create_bank(session, body.name, body.radius)
    service.audit_created(session, bank, actor=caller.actor)
    return _summary(session, bank)


@router.get("/{name}", openapi_extra=READERS)
def get_bank(session: DbSession, name: BankName) -> BankOut:
    return _summary(session, service.get_bank(session, name))


@router.patch("/{name}", openapi_extra=ADMINS)
def change_bank(session: DbSession, caller: Caller, name: BankName, body: BankChange) -> BankOut:
    """Enable or disable a bank, or change its radius. Workers apply it within
    MODERATION_BANK_REFRESH_S."""
    bank = service.get_bank(session, name)
    changes: dict[str, Any] = {"enabled": body.enabled}
    if "radius" in body.model_fields_set:
        changes["radius"] = body.radius
    service.update_bank(session, bank, actor=caller.actor, **changes)
    return _summary(session, bank)


@router.get("/{name}/entries", openapi_extra=READERS)
def list_entries(
    session: DbSession,
    name: BankName,
    after_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EntryPage:
    """Entries in id order (their signals, never content); page on with `after_id`."""
    bank = service.get_bank(session, name)
    entries = service.list_entries(session, bank, after_id=after_id, limit=limit + 1)
    more = len(entries) > limit
    entries = entries[:limit]
    return EntryPage(
        entries=[EntryOut.of(e) for e in entries], next_after_id=entries[-1].id if more else None
    )


@router.post("/{name}/entries", status_code=status.HTTP_201_CREATED, openapi_extra=ADMINS)
def add_entries(
    session: DbSession, runtime: AppRuntime, caller: Caller, name: BankName, body: EntriesIn
) -> EntriesAdded:
    """Add entries by SHA-256, PDQ hash or embedding (any of them in one entry)."""
    bank = service.get_bank(session, name)
    entries = []
    model = None
    for item in body.entries:
        if item.sha256 is None and item.pdq is None and item.embedding is None:
            raise HTTPException(
                422,
                "each entry needs at least one of sha256, pdq or embedding",
            )
        vector = None
        if item.embedding is not None:
            model = model or _configured_model(session, runtime.settings)
            vector = _vector(item.embedding, model.dim)
        entries.append(
            service.NewEntry(
                sha256=parse_hex(item.sha256, length=32, what="SHA-256") if item.sha256 else None,
                pdq=PdqHash(parse_hex(item.pdq, length=32, what="PDQ"), item.pdq_quality)
                if item.pdq
                else None,
                embedding=vector,
                model=model if vector is not None else None,
                source_ref=item.source_ref,
            )
        )
    rows = service.add_entries(session, bank, entries, added_by=caller.actor)
    service.audit_added(session, bank, rows, actor=caller.actor, how="signals")
    return EntriesAdded(entries=[EntryOut.of(r) for r in rows])


@router.post(
    "/{name}/entries/image",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={**ADMINS, **image_body()},
)
def add_image_entry(
    session: DbSession,
    runtime: AppRuntime,
    request: Request,
    caller: Caller,
    name: BankName,
    image: Annotated[UploadFile, File(description="The known-bad image; its bytes are not kept.")],
    source_ref: Annotated[
        str | None, Form(max_length=2000, description="Where the source lives, restricted.")
    ] = None,
) -> EntriesAdded:
    """Add an entry computed from an image: its SHA-256, PDQ and embedding under the
    configured model, exactly as screening computes them."""
    bank = service.get_bank(session, name)
    settings = runtime.settings
    data = image.file.read(settings.max_bytes + 1)
    if len(data) > settings.max_bytes:
        raise HTTPException(
            413,
            f"the image is larger than MODERATION_MAX_BYTES ({settings.max_bytes} bytes)",
        )
    embedders = EMBEDDERS.get(request)
    # A model that cannot load here answers 503, naming MODERATION_MODEL (ModelUnavailable).
    with embedders.lock:
        embedder = embedders.get(registry.serving_name(session, settings.resolved_model()))
    model = registry.registered(session, embedder)
    with embedders.lock:
        entry = service.entry_from_image(
            data,
            embedder,
            model,
            DecodeLimits.from_settings(settings),
            None if source_ref is None else source_ref.replace("\x00", ""),
        )
    rows = service.add_entries(session, bank, [entry], added_by=caller.actor)
    service.audit_added(session, bank, rows, actor=caller.actor, how="image")
    return EntriesAdded(entries=[EntryOut.of(r) for r in rows])


@router.delete("/{name}/entries/{entry_id}", openapi_extra=ADMINS)
def remove_entry(
    session: DbSession, caller: Caller, name: BankName, entry_id: EntryId
) -> dict[str, Any]:
    """Remove an entry, and its hits that no reviewer confirmed or escalated (an entry
    with such hits is kept: 409). Answers what was removed."""
    bank = service.get_bank(session, name)
    return service.remove_entry(session, bank, entry_id, actor=caller.actor)


@router.post(
    "/{name}/import", openapi_extra={**ADMINS, **body_up_to(MAX_IMPORT_BYTES + FORM_FRAMING_BYTES)}
)
def import_pdq_list(
    session: DbSession,
    caller: Caller,
    name: BankName,
    hashes: Annotated[UploadFile, File(description="A PDQ hash list, one hash per line.")],
    dry_run: Annotated[bool, Query(description="Check the list; add nothing.")] = False,
) -> ImportReport:
    """Import a PDQ hash list as ThreatExchange and HMA exchange them (docs/api.md lists
    the shapes): good lines are added, each rejected line is reported with its number and
    why. Hashes already in the bank are not added twice."""
    bank = service.get_bank(session, name)
    raw = hashes.file.read(MAX_IMPORT_BYTES + 1)
    if len(raw) > MAX_IMPORT_BYTES:
        raise HTTPException(
            413,
            f"hash lists are imported {MAX_IMPORT_BYTES} bytes at a time; split the file",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HTTPException(
            422,
            f"the list is not UTF-8 text (byte {error.start}); hash lists are text",
        ) from None
    parsed = parse_pdq_list(text)
    if len(parsed.hashes) + len(parsed.rejected) > MAX_IMPORT_LINES:
        raise HTTPException(
            413,
            f"hash lists are imported {MAX_IMPORT_LINES} lines at a time; split the file",
        )
    known = service.pdq_in_bank(session, bank, [h.pdq.bits for h in parsed.hashes])
    new: dict[bytes, PdqHash] = {}
    for item in parsed.hashes:
        if item.pdq.bits not in known:
            new.setdefault(item.pdq.bits, item.pdq)
    if new and not dry_run:
        rows = service.add_entries(
            session, bank, [service.NewEntry(pdq=p) for p in new.values()], added_by=caller.actor
        )
        filename = (hashes.filename or "").replace("\x00", "")[:200]
        service.audit_added(session, bank, rows, actor=caller.actor, how=f"import {filename}")
    return ImportReport(
        added=len(new),
        duplicates=len(parsed.hashes) - len(new),
        rejected=[RejectedLine(line=r.line, reason=r.reason) for r in parsed.rejected],
        dry_run=dry_run,
    )


def _configured_model(session: DbSession, settings: Settings) -> EmbeddingModel:
    """The active model (the configured one where the registry has none yet): what
    precomputed embeddings are taken to come from."""
    active = registry.active_model(session)
    if active is not None:
        return active
    name = settings.resolved_model()
    return get_or_create_model(session, name, model_dim(name))


def _vector(values: list[float], dim: int) -> np.ndarray:
    if len(values) != dim:
        raise HTTPException(
            422,
            f"the embedding has {len(values)} dimensions; the configured model has {dim}",
        )
    vector: np.ndarray = normalise(np.asarray(values, dtype=np.float32))[0]
    return vector
