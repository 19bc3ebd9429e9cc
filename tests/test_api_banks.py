"""Banks over HTTP and `moderation bank remove`: every change audited, reads for reviewers
and analysts, hash lists imported line by line."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from moderation.audit.models import AuditEvent
from moderation.auth.models import Role
from moderation.banks import service as banks
from moderation.banks.hash_list import parse_pdq_list
from moderation.banks.models import BankEntry
from moderation.embedding.service import model_dim
from moderation.images.hashing import sha256
from moderation.images.signals import SignalType
from moderation.main.cli import main
from moderation.review.models import Hit, ReviewStatus
from moderation.runtime import Runtime
from moderation.screening import service as screening
from tests.api_fixtures import api, bearer, keys
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS
from tests.images import encode, textured

__all__ = ["api", "keys"]

PDQ_A = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
PDQ_B = "0" * 63 + "1"
PDQ_C = "ab" * 32
SHA_A = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def _audit(action: str, bank: str = "csam-known") -> list[AuditEvent]:
    """The bank's events (the audit log outlives each test's data: it is append-only)."""
    with TEST_RUNTIME.session() as session:
        bank_id = banks.get_bank(session, bank).id
        query = (
            select(AuditEvent)
            .where(
                AuditEvent.action == action,
                AuditEvent.subject_type == "bank",
                AuditEvent.subject_id == str(bank_id),
            )
            .order_by(AuditEvent.id)
        )
        return list(session.scalars(query))


def _create(api: TestClient, admin: dict[str, str], name: str = "csam-known") -> dict[str, Any]:
    response = api.post("/v1/banks", json={"name": name}, headers=admin)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_banks_are_created_listed_and_changed_with_audit(
    api: TestClient, keys: dict[Role, str]
) -> None:
    admin = bearer(keys[Role.ADMIN])
    created = _create(api, admin)
    assert (created["name"], created["enabled"], created["radius"], created["entries"]) == (
        "csam-known",
        True,
        None,
        0,
    )
    assert api.post("/v1/banks", json={"name": "csam-known"}, headers=admin).status_code == 409
    (event,) = _audit("bank.create")
    assert event.actor.startswith("key:")
    assert event.after == {
        "name": "csam-known",
        "radius": None,
        "enabled": True,
    }

    changed = api.patch(
        "/v1/banks/csam-known", json={"enabled": False, "radius": 0.1}, headers=admin
    ).json()
    assert (changed["enabled"], changed["radius"]) == (False, 0.1)
    # Radius null: back to the global radius; enabled untouched.
    back = api.patch("/v1/banks/csam-known", json={"radius": None}, headers=admin).json()
    assert (back["enabled"], back["radius"]) == (False, None)
    updates = _audit("bank.update")
    assert [(e.before, e.after) for e in updates] == [
        (
            {"name": "csam-known", "radius": None, "enabled": True},
            {"name": "csam-known", "radius": 0.1, "enabled": False},
        ),
        (
            {"name": "csam-known", "radius": 0.1, "enabled": False},
            {"name": "csam-known", "radius": None, "enabled": False},
        ),
    ]
    # A change that changes nothing is not an event.
    api.patch("/v1/banks/csam-known", json={"enabled": False}, headers=admin)
    assert len(_audit("bank.update")) == 2
    assert api.patch("/v1/banks/csam-known", json={"radius": 3}, headers=admin).status_code == 422
    assert api.patch("/v1/banks/nope", json={"enabled": True}, headers=admin).status_code == 404

    listed = api.get("/v1/banks", headers=bearer(keys[Role.ANALYST])).json()
    assert [b["name"] for b in listed["banks"]] == ["csam-known"]
    shown = api.get("/v1/banks/csam-known", headers=bearer(keys[Role.REVIEWER])).json()
    assert shown["enabled"] is False


def test_entries_by_signal_are_added_listed_and_removed(
    api: TestClient, keys: dict[Role, str]
) -> None:
    admin = bearer(keys[Role.ADMIN])
    _create(api, admin)
    dim = model_dim(TEST_SETTINGS.resolved_model())
    body = {
        "entries": [
            {"sha256": SHA_A},
            {"pdq": PDQ_A, "pdq_quality": 90, "source_ref": "vault://case-17/a"},
            {"embedding": [1.0] + [0.0] * (dim - 1)},
        ]
    }
    response = api.post("/v1/banks/csam-known/entries", json=body, headers=admin)
    assert response.status_code == 201, response.text
    added = response.json()["entries"]
    assert added[0]["sha256"] == SHA_A
    assert (added[1]["pdq"], added[1]["pdq_quality"]) == (PDQ_A, 90)
    assert b"vault://case-17" not in response.content
    assert len(added[2]["embedding_models"]) == 1
    (event,) = _audit("bank.entries.add")
    assert event.after is not None
    assert event.after["ids"] == [a["id"] for a in added]

    wrongs: list[dict[str, Any]] = [
        {"entries": [{}]},
        {"entries": [{"embedding": [1.0] * (dim + 1)}]},
        {"entries": [{"embedding": [0.0] * dim}]},
        {"entries": [{"pdq": "xyz"}]},
    ]
    for wrong in wrongs:
        answer = api.post("/v1/banks/csam-known/entries", json=wrong, headers=admin)
        assert answer.status_code == 422, wrong

    reader = bearer(keys[Role.ANALYST])
    first = api.get("/v1/banks/csam-known/entries", params={"limit": 2}, headers=reader).json()
    assert [e["id"] for e in first["entries"]] == [a["id"] for a in added[:2]]
    rest = api.get(
        "/v1/banks/csam-known/entries",
        params={"limit": 2, "after_id": first["next_after_id"]},
        headers=reader,
    ).json()
    assert ([e["id"] for e in rest["entries"]], rest["next_after_id"]) == ([added[2]["id"]], None)

    removed = api.delete(f"/v1/banks/csam-known/entries/{added[1]['id']}", headers=admin)
    assert removed.status_code == 200
    assert removed.json()["pdq"] == PDQ_A
    (event,) = _audit("bank.entries.remove")
    assert event.before is not None
    assert event.before["pdq"] == PDQ_A
    again = api.delete(f"/v1/banks/csam-known/entries/{added[1]['id']}", headers=admin)
    assert again.status_code == 404
    assert api.get("/v1/banks/csam-known", headers=reader).json()["entries"] == 2


def test_an_entry_with_a_confirmed_hit_is_kept(api: TestClient, keys: dict[Role, str]) -> None:
    admin = bearer(keys[Role.ADMIN])
    _create(api, admin)
    entries = api.post(
        "/v1/banks/csam-known/entries",
        json={"entries": [{"sha256": SHA_A}, {"pdq": PDQ_A}]},
        headers=admin,
    ).json()["entries"]
    with TEST_RUNTIME.session() as session:
        upload, _ = screening.submit(session, "file:///tmp/x.jpg")
        for entry, status in zip(
            entries, (ReviewStatus.CONFIRMED, ReviewStatus.PENDING), strict=True
        ):
            session.add(
                Hit(
                    upload_id=upload.id,
                    bank_entry_id=entry["id"],
                    signal=SignalType.SHA256,
                    distance=0,
                    review_status=status,
                )
            )
    kept = api.delete(f"/v1/banks/csam-known/entries/{entries[0]['id']}", headers=admin)
    assert kept.status_code == 409
    assert "confirmed or escalated" in kept.json()["detail"]
    gone = api.delete(f"/v1/banks/csam-known/entries/{entries[1]['id']}", headers=admin)
    assert gone.status_code == 200
    with TEST_RUNTIME.session() as session:
        assert [h.bank_entry_id for h in session.scalars(select(Hit))] == [entries[0]["id"]]
    # The database keeps it whoever asks: plain SQL too.
    with (
        pytest.raises(IntegrityError, match="confirmed or escalated"),
        TEST_RUNTIME.session() as session,
    ):
        session.execute(delete(BankEntry).where(BankEntry.id == entries[0]["id"]))


def test_an_image_becomes_an_entry_and_its_bytes_are_not_kept(
    api: TestClient, keys: dict[Role, str]
) -> None:
    admin = bearer(keys[Role.ADMIN])
    _create(api, admin)
    data = encode(textured(77))
    response = api.post(
        "/v1/banks/csam-known/entries/image",
        files={"image": ("bad.jpg", data, "image/jpeg")},
        data={"source_ref": "vault://case-18/bad.jpg"},
        headers=admin,
    )
    assert response.status_code == 201, response.text
    (entry,) = response.json()["entries"]
    assert entry["sha256"] == sha256(data).hex()
    assert entry["pdq"] is not None
    assert entry["pdq_quality"] is not None
    assert len(entry["embedding_models"]) == 1
    # Where the source lives is kept for re-embedding, and never served.
    assert entry["has_source_ref"] is True
    assert b"vault://case-18" not in response.content
    with TEST_RUNTIME.session() as session:
        stored = session.get_one(BankEntry, entry["id"])
        assert stored.source_ref == "vault://case-18/bad.jpg"
    broken = api.post(
        "/v1/banks/csam-known/entries/image",
        files={"image": ("bad.jpg", data[:300], "image/jpeg")},
        headers=admin,
    )
    assert broken.status_code == 422
    assert broken.json()["code"] in {"truncated_image", "corrupt_image"}


HASH_LIST = f"""# exported from a hash-sharing program
{PDQ_A}
pdq {PDQ_B} 'Sample Data' tags=csam
{PDQ_C},100,cat.jpg
video_md5 d41d8cd98f00b204e9800998ecf8427e
{PDQ_A[:60]}

{PDQ_C[:-1]}g
{PDQ_A}
{PDQ_B.upper()}\t80\tfrom a tab separated list
"""


def test_a_pdq_list_is_imported_and_each_bad_line_reported(
    api: TestClient, keys: dict[Role, str]
) -> None:
    admin = bearer(keys[Role.ADMIN])
    _create(api, admin)
    files = {"hashes": ("export.txt", HASH_LIST.encode(), "text/plain")}
    dry = api.post(
        "/v1/banks/csam-known/import", params={"dry_run": True}, files=files, headers=admin
    )
    assert dry.status_code == 200, dry.text
    assert dry.json()["added"] == 3
    assert api.get("/v1/banks/csam-known", headers=admin).json()["entries"] == 0

    report = api.post("/v1/banks/csam-known/import", files=files, headers=admin).json()
    assert report["added"] == 3
    # Line 9 repeats line 2; line 10 is line 3's hash in capitals.
    assert report["duplicates"] == 2
    rejected = {r["line"]: r["reason"] for r in report["rejected"]}
    assert sorted(rejected) == [5, 6, 8]
    assert "signal type 'video_md5' is not PDQ" in rejected[5]
    assert "64 hex digits, got 60" in rejected[6]
    assert "not hexadecimal" in rejected[8]
    with TEST_RUNTIME.session() as session:
        stored = {(e.pdq.hex(), e.pdq_quality) for e in session.scalars(select(BankEntry)) if e.pdq}
    assert stored == {(PDQ_A, None), (PDQ_B, None), (PDQ_C, 100)}
    (event,) = _audit("bank.entries.add")
    assert event.after is not None
    assert event.after["count"] == 3
    assert event.after["how"] == "import export.txt"

    # Imported again: nothing new.
    again = api.post("/v1/banks/csam-known/import", files=files, headers=admin).json()
    assert (again["added"], again["duplicates"]) == (0, 5)
    not_text = {"hashes": ("x.bin", b"\xff\xfe\x00", "application/octet-stream")}
    answer = api.post("/v1/banks/csam-known/import", files=not_text, headers=admin)
    assert answer.status_code == 422


def test_a_threatexchange_csv_export_is_read_by_its_header() -> None:
    text = (
        "signal_type,signal_str,collab,category,tags\n"
        f"pdq,{PDQ_A},Sample Data,POSITIVE_CLASS,csam\n"
        f'pdq,{PDQ_B},"Collab, with comma",POSITIVE_CLASS,"a b"\n'
        f"url_md5,{SHA_A[:32]},Sample Data,POSITIVE_CLASS,\n"
        "pdq,,Sample Data,POSITIVE_CLASS,\n"
    )
    parsed = parse_pdq_list(text)
    assert [(h.line, h.pdq.hex) for h in parsed.hashes] == [(2, PDQ_A), (3, PDQ_B)]
    assert [r.line for r in parsed.rejected] == [4, 5]
    assert "not PDQ" in parsed.rejected[0].reason
    quality = parse_pdq_list(f"hash,quality\n{PDQ_A},101\n")
    assert quality.rejected[0].line == 2
    assert "0 to 100" in quality.rejected[0].reason


def test_bank_remove_on_the_command_line(
    api: TestClient, keys: dict[Role, str], runtime: Runtime
) -> None:
    admin = bearer(keys[Role.ADMIN])
    _create(api, admin)
    entries = api.post(
        "/v1/banks/csam-known/entries",
        json={"entries": [{"sha256": SHA_A}, {"pdq": PDQ_A}]},
        headers=admin,
    ).json()["entries"]
    ids = [str(e["id"]) for e in entries]
    result = CliRunner().invoke(main, ["bank", "remove", "csam-known", *ids, "--json"], obj=runtime)
    assert result.exit_code == 0, result.output
    assert [r["bank_entry_id"] for r in json.loads(result.output)] == [e["id"] for e in entries]
    assert [e.actor.startswith("cli:") for e in _audit("bank.entries.remove")] == [True, True]
    missing = CliRunner().invoke(main, ["bank", "remove", "csam-known", ids[0]], obj=runtime)
    assert missing.exit_code == 1
    assert f"has no entry {ids[0]}" in missing.output


ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/v1/banks", {}),
    ("GET", "/v1/banks/csam-known", {}),
    ("GET", "/v1/banks/csam-known/entries", {}),
    ("POST", "/v1/banks", {"json": {"name": "another"}}),
    ("PATCH", "/v1/banks/csam-known", {"json": {"enabled": True}}),
    ("POST", "/v1/banks/csam-known/entries", {"json": {"entries": [{"sha256": SHA_A}]}}),
    (
        "POST",
        "/v1/banks/csam-known/entries/image",
        {"files": {"image": ("a.jpg", b"x", "image/jpeg")}},
    ),
    ("DELETE", "/v1/banks/csam-known/entries/1", {}),
    ("POST", "/v1/banks/csam-known/import", {"files": {"hashes": ("a", PDQ_A.encode())}}),
]


@pytest.mark.parametrize(("method", "path", "request_args"), ROUTES)
def test_who_may_read_and_change_banks(
    api: TestClient,
    keys: dict[Role, str],
    method: str,
    path: str,
    request_args: dict[str, Any],
) -> None:
    _create(api, bearer(keys[Role.ADMIN]))
    assert api.request(method, path, **request_args).status_code == 401
    readers = {Role.REVIEWER, Role.ANALYST} if method == "GET" else set()
    for role in (Role.SUBMITTER, Role.REVIEWER, Role.ANALYST):
        status = api.request(method, path, headers=bearer(keys[role]), **request_args).status_code
        if role in readers:
            assert status == 200, (role, status)
        else:
            assert status == 403, (role, status)


def test_bank_create_and_add_on_the_command_line_are_audited(
    clean_db: None, runtime: Runtime
) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["bank", "create", "csam-known"], obj=runtime).exit_code == 0
    added = runner.invoke(main, ["bank", "add", "csam-known", "--sha256", SHA_A], obj=runtime)
    assert added.exit_code == 0, added.output
    (created,) = _audit("bank.create")
    (entries,) = _audit("bank.entries.add")
    assert created.actor.startswith("cli:")
    assert entries.after is not None
    assert (entries.after["how"], entries.after["count"]) == ("cli", 1)
