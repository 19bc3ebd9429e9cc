"""The command line tells the truth: what it cut, what it skipped, why nothing moves, and
infrastructure errors as one line with the fix, each with its exit status.

Run in-process through Click's runner, with settings changed per test where a test needs
another database, broker or queue; the Redis-down case runs the real command in a child
process, since the Celery app keeps the broker it was made with.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import make_url

from moderation.banks import service as banks
from moderation.banks.models import BankEntry
from moderation.embedding.service import get_or_create_model
from moderation.images.decode import ALLOWED_FORMATS
from moderation.images.signals import SignalType
from moderation.images.sniff import NOT_AN_IMAGE, SNIFFED_FORMATS, image_format, why_not_an_image
from moderation.main.cli import main
from moderation.review.models import Hit
from moderation.runtime import Runtime
from moderation.screening import service as screening
from moderation.screening.cli import Progress
from moderation.screening.models import Upload, UploadStatus
from moderation.screening.waiting import Tally, tally, why_stalled
from tests.conftest import TEST_ENV, TEST_RUNTIME
from tests.images import encode, textured, write
from tests.queues import queue, queue_runtime, queued_uploads

__all__ = ["queue", "queue_runtime"]


def one_line_from_process(variables: dict[str, str], exit_code: int, *args: str) -> str:
    """The error of `moderation ARGS` run as an operator runs it, in a process of its own
    reading the tests' MODERATION_* variables with `variables` on top: one line, no
    traceback, exit status `exit_code`."""
    process = subprocess.run(
        [sys.executable, "-m", "moderation", *args],
        env={**os.environ, **TEST_ENV, **variables},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == exit_code, process.stderr
    assert "Traceback" not in process.stderr
    (line,) = process.stderr.strip().splitlines()
    return line


def run_on(runtime: Runtime, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), obj=runtime)


def run(*args: str) -> Result:
    """The command on the tests' runtime."""
    return run_on(TEST_RUNTIME, *args)


def one_line_error(result: Result, exit_code: int) -> str:
    """The error of a command that must fail with `exit_code`: one line, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    return line


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def database_url(name: str, password: str | None = None) -> str:
    url = make_url(TEST_ENV["MODERATION_DATABASE_URL"]).set(database=name, password=password)
    return url.render_as_string(hide_password=False)


# --version, db upgrade, bank add


def test_version_is_the_installed_one() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert (
        result.output.strip() == f"moderation, version {importlib.metadata.version('moderation')}"
    )


def test_db_upgrade_names_the_database_without_its_password(
    make_runtime: Callable[..., Runtime],
) -> None:
    name = make_url(TEST_ENV["MODERATION_DATABASE_URL"]).database
    assert name is not None
    # The test server trusts local connections, so any password is accepted and ignored.
    result = run_on(
        make_runtime(database_url=database_url(name, password="s3cret-pw")), "db", "upgrade"
    )
    assert result.exit_code == 0, result.output
    assert "database postgresql+psycopg2://postgres:***@" in result.output
    assert f"/{name} is at the latest migration (" in result.output
    assert "s3cret-pw" not in result.output


@pytest.mark.usefixtures("clean_db")
def test_bank_add_of_one_entry_says_its_id() -> None:
    assert run("bank", "create", "known-bad").exit_code == 0
    result = run("bank", "add", "known-bad", "--sha256", "ab" * 32)
    with TEST_RUNTIME.session() as session:
        (entry_id,) = session.scalars(select(BankEntry.id)).all()
    added, hunting = result.output.strip().splitlines()
    assert added == f"added 1 entry to known-bad: id {entry_id}"
    assert hunting.startswith("a retro-hunt searches past uploads for them in the background")


# Infrastructure errors: one line with the fix, exit status 4.


def test_a_database_that_does_not_exist_says_to_run_db_upgrade(
    make_runtime: Callable[..., Runtime],
) -> None:
    name = f"moderation_absent_{uuid.uuid4().hex[:8]}"
    line = one_line_error(run_on(make_runtime(database_url=database_url(name)), "hits"), 4)
    assert f"database '{name}' does not exist" in line
    assert line.endswith("run `moderation db upgrade`")


@pytest.fixture(scope="module")
def empty_database() -> Iterator[str]:
    name = f"moderation_empty_{uuid.uuid4().hex[:8]}"
    admin = create_engine(database_url("postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.mark.parametrize("command", [["hits"], ["bank", "list"], ["uploads"]])
def test_a_database_not_migrated_says_to_run_db_upgrade(
    make_runtime: Callable[..., Runtime], empty_database: str, command: list[str]
) -> None:
    runtime = make_runtime(database_url=database_url(empty_database))
    line = one_line_error(run_on(runtime, *command), 4)
    assert f"database '{empty_database}'" in line
    assert "has no schema: run `moderation db upgrade`" in line


def test_postgres_unreachable_names_the_url_and_the_sweeper(
    make_runtime: Callable[..., Runtime],
) -> None:
    port = closed_port()
    url = f"postgresql+psycopg2://postgres:pw@127.0.0.1:{port}/moderation"
    line = one_line_error(run_on(make_runtime(database_url=url), "bank", "list"), 4)
    assert (
        f"cannot reach PostgreSQL at postgresql+psycopg2://postgres:***@127.0.0.1:{port}/" in line
    )
    assert "Connection refused" in line
    assert "sweeper re-sends them" in line
    assert ":pw@" not in line


@pytest.mark.usefixtures("clean_db")
def test_redis_unreachable_says_the_uploads_stay_queued_for_the_sweeper(tmp_path: Path) -> None:
    image = write(tmp_path / "a.jpg", encode(textured(1)))
    port = closed_port()
    redis_url = f"redis://:pw@127.0.0.1:{port}/0"
    line = one_line_from_process({"MODERATION_REDIS_URL": redis_url}, 4, "submit", str(image))
    assert line.startswith(f"Error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0")
    assert "stay queued in PostgreSQL" in line
    assert "sweeper re-sends them once Redis is back" in line
    # As it says: the upload was recorded, and waits for its message.
    with TEST_RUNTIME.session() as session:
        (upload,) = session.scalars(select(Upload)).all()
    assert (upload.uri, upload.status) == (image.resolve().as_uri(), UploadStatus.QUEUED)


@pytest.mark.usefixtures("clean_db")
def test_an_unknown_bank_is_one_line() -> None:
    line = one_line_error(run("bank", "add", "nowhere", "--pdq", "ab" * 32), 1)
    assert line == "Error: no bank named 'nowhere'; create it with `moderation bank create nowhere`"


# hits


@pytest.fixture
def many_hits(clean_db: None) -> list[int]:
    """105 hits, the newest one a CLIP hit under a named model; their ids, oldest first."""
    with TEST_RUNTIME.session() as session:
        bank = banks.create_bank(session, "known-bad")
        (entry,) = banks.add_entries(
            session, bank, [banks.NewEntry(sha256=b"\x01" * 32)], added_by="test"
        )
        model = get_or_create_model(session, "clip-for-hits", 8)
        upload_ids = screening.submit_many(
            session, [f"https://example.com/{i}.jpg" for i in range(105)]
        )
        rows = [
            {
                "upload_id": upload_id,
                "bank_entry_id": entry.id,
                "signal": SignalType.SHA256 if i < 104 else SignalType.CLIP,
                "distance": 0.0 if i < 104 else 0.01,
                "frame_index": 0,
                "model_id": None if i < 104 else model.id,
            }
            for i, upload_id in enumerate(upload_ids)
        ]
        return list(session.scalars(insert(Hit).returning(Hit.id), rows))


def test_hits_are_newest_first_and_say_when_they_are_cut(many_hits: list[int]) -> None:
    result = run("hits", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert [h["hit_id"] for h in shown] == many_hits[::-1][:100]
    assert result.stderr.strip() == (
        "showing 100 of 105 hits, newest first: --limit N or --all for more"
    )
    # The CLIP hit names its model; the others have none.
    assert shown[0]["signal"] == "clip"
    assert shown[0]["model"] == "clip-for-hits"
    assert {h["model"] for h in shown[1:]} == {None}

    table = run("hits", "--limit", "3")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["HIT", "UPLOAD", "BANK", "ENTRY"]
    assert lines[1].split()[0] == str(many_hits[-1])
    assert lines[-1] == "showing 3 of 105 hits, newest first: --limit N or --all for more"
    assert len(lines) == 1 + 3 + 1

    everything = run("hits", "--all", "--json")
    assert [h["hit_id"] for h in json.loads(everything.stdout)] == many_hits[::-1]
    assert everything.stderr == ""
    assert run("hits", "--limit", "0").exit_code == 2


def test_the_hits_table_fits_120_columns_whatever_the_bank_is_called(clean_db: None) -> None:
    long_name = "partner-hash-list-imported-2026-12-07-from-the-ncmec-feed-" + "x" * 120
    with TEST_RUNTIME.session() as session:
        bank = banks.create_bank(session, long_name)
        (entry,) = banks.add_entries(
            session, bank, [banks.NewEntry(sha256=b"\x01" * 32)], added_by="test"
        )
        (upload_id,) = screening.submit_many(session, ["https://example.com/a-long-name.jpg"])
        session.execute(
            insert(Hit),
            [{"upload_id": upload_id, "bank_entry_id": entry.id, "signal": SignalType.PDQ,
              "distance": 12.0, "threshold": 31.0, "frame_index": 107, "retroactive": True}],
        )  # fmt: skip
    lines = run("hits").stdout.splitlines()
    assert len(lines) == 2
    assert max(len(line) for line in lines) <= 120
    assert long_name[:23] + "…" in lines[1]
    assert "retro-hunt" in lines[1]


def test_one_upload_is_shown_with_its_signals_and_hits(many_hits: list[int]) -> None:
    with TEST_RUNTIME.session() as session:
        (upload_id, entry_id) = session.execute(
            select(Hit.upload_id, Hit.bank_entry_id).where(Hit.id == many_hits[-1])
        ).one()
    shown = run("upload", str(upload_id))
    assert shown.exit_code == 0, shown.output
    assert f"upload_id: {upload_id}" in shown.stdout
    assert "status: queued" in shown.stdout
    assert "no signals" in shown.stdout
    (hit_line,) = [
        line for line in shown.stdout.splitlines() if line.startswith(str(many_hits[-1]))
    ]
    assert hit_line.split()[1:5] == [str(upload_id), "known-bad", str(entry_id), "clip"]
    as_json = json.loads(run("upload", str(upload_id), "--json").stdout)
    assert [h["hit_id"] for h in as_json["hits"]] == [many_hits[-1]]
    assert as_json["hits"][0]["model"] == "clip-for-hits"
    missing = run("upload", "987654321")
    assert (missing.exit_code, missing.output.strip()) == (1, "Error: no upload with id 987654321")


def test_uploads_say_when_they_are_cut_too(many_hits: list[int]) -> None:
    result = run("uploads", "--status", "queued", "--json")
    listed = json.loads(result.stdout)
    assert len(listed) == 100
    assert listed[0]["upload_id"] > listed[-1]["upload_id"]
    assert result.stderr.strip() == (
        "showing 100 of 105 uploads, newest first: --limit N or --all for more"
    )
    assert len(json.loads(run("uploads", "--all", "--json").stdout)) == 105
    assert run("uploads", "--status", "failed").stdout.strip() == "no uploads"


def test_hits_say_nothing_more_when_nothing_was_cut(many_hits: list[int]) -> None:
    result = run("hits", "--limit", "105")
    assert "showing" not in result.output
    assert len(result.stdout.splitlines()) == 1 + 105


# submit: directories by content, missing files


def test_sniffing_knows_exactly_the_formats_decoded() -> None:
    assert set(ALLOWED_FORMATS) == SNIFFED_FORMATS
    image = textured(1)
    for fmt in ALLOWED_FORMATS:
        assert image_format(encode(image, fmt)[:16]) == fmt
    assert why_not_an_image(b"") == "empty"
    assert why_not_an_image(b"hello, world\n") == NOT_AN_IMAGE
    assert "HEIC is not enabled" in (why_not_an_image(b"\0\0\0\x18ftypheic\0\0") or "")


@pytest.mark.usefixtures("clean_db")
def test_a_directory_is_submitted_by_content_and_what_was_skipped_is_said(
    tmp_path: Path, queue: str, queue_runtime: Runtime, redis_client: redis.Redis
) -> None:
    folder = tmp_path / "inbox"
    images = [
        write(folder / "photo-without-extension", encode(textured(1))),
        write(folder / "really-a-png.txt", encode(textured(2), "PNG")),
        write(folder / "deep" / "c.gif", encode(textured(3), "GIF")),
    ]
    write(folder / "text-named.jpg", b"this is text, not a JPEG\n")
    write(folder / "empty.png", b"")
    write(folder / "phone.heic", b"\0\0\0\x18ftypheic" + b"\0" * 32)
    write(folder / ".hidden.jpg", encode(textured(4)))
    write(folder / ".thumbnails" / "t.jpg", encode(textured(5)))
    os.mkfifo(folder / "pipe.jpg")

    result = run_on(queue_runtime, "submit", str(folder), "--json")

    assert result.exit_code == 0, result.output
    submitted = json.loads(result.stdout)
    assert sorted(s["uri"] for s in submitted) == sorted(p.resolve().as_uri() for p in images)
    assert sorted(queued_uploads(redis_client, queue)) == sorted(s["upload_id"] for s in submitted)
    skipped = result.stderr.splitlines()
    assert skipped[0] == "skipped 6 file(s) in the directories given:"
    assert sorted(skipped[1:]) == sorted(
        [
            f"  {folder / '.hidden.jpg'}: hidden",
            f"  {folder / '.thumbnails' / 't.jpg'}: hidden",
            f"  {folder / 'empty.png'}: empty",
            f"  {folder / 'phone.heic'}: HEIC is not enabled; install pillow-heif",
            f"  {folder / 'pipe.jpg'}: not a regular file",
            f"  {folder / 'text-named.jpg'}: {NOT_AN_IMAGE}",
        ]
    )


@pytest.mark.usefixtures("clean_db")
def test_a_file_named_on_the_command_line_is_submitted_whatever_it_holds(
    tmp_path: Path, queue_runtime: Runtime
) -> None:
    text_file = write(tmp_path / "notes.jpg", b"not an image\n")
    result = run_on(queue_runtime, "submit", str(text_file), "--json")
    assert result.exit_code == 0, result.output
    # The worker refuses it with its own code; named explicitly, it is not second-guessed.
    assert [s["uri"] for s in json.loads(result.stdout)] == [text_file.resolve().as_uri()]


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("as_uri", [False, True])
def test_a_missing_local_file_is_refused_at_once(
    tmp_path: Path, queue: str, queue_runtime: Runtime, redis_client: redis.Redis, as_uri: bool
) -> None:
    present = write(tmp_path / "a.jpg", encode(textured(1)))
    missing = tmp_path / "missing.jpg"
    line = one_line_error(
        run_on(queue_runtime, "submit", str(present), missing.as_uri() if as_uri else str(missing)),
        1,
    )
    assert line == f"Error: not_found: {missing.resolve()} does not exist; nothing was submitted"
    with TEST_RUNTIME.session() as session:
        assert session.scalars(select(Upload)).all() == []
    assert redis_client.llen(queue) == 0


# submit --wait


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("as_json", [False, True])
def test_wait_with_no_worker_on_the_queue_says_so_and_times_out(
    tmp_path: Path,
    make_runtime: Callable[..., Runtime],
    redis_client: redis.Redis,
    as_json: bool,
) -> None:
    queue = f"nobody-listens-{uuid.uuid4().hex[:8]}"
    image = write(tmp_path / "a.jpg", encode(textured(1)))
    try:
        result = run_on(
            make_runtime(queue=queue),
            "submit", str(image), "--wait", "--timeout", "1.5", "--stall-after", "0.3",
            *(["--json"] if as_json else []),
        )  # fmt: skip
    finally:
        redis_client.delete(queue)
    line = one_line_error(result, 3)
    cause = f"no worker is consuming queue {queue}: start one with `moderation worker`"
    assert line.startswith("Error: 1 of 1 upload(s) not finished after 1.5 s; ")
    assert cause in line
    # Said while waiting too, not only at the end.
    assert f"waiting: {cause}" in result.stderr
    progress = "0 of 1 finished: 0 screened, 0 failed, 0 processing, 1 queued"
    if as_json:
        assert progress not in result.stderr
        (row,) = json.loads(result.stdout)
        assert row["status"] == "queued"
    else:
        assert progress in result.stderr
        assert "queued" in result.stdout


@pytest.mark.e2e
@pytest.mark.usefixtures("clean_db", "worker")
def test_wait_exits_0_when_all_are_screened_and_1_when_any_failed(tmp_path: Path) -> None:
    good = write(tmp_path / "good.jpg", encode(textured(1)))
    broken = write(tmp_path / "broken.jpg", b"not an image at all\n")

    screened = run_on(TEST_RUNTIME, "submit", str(good), "--wait", "--timeout", "60", "--json")
    assert screened.exit_code == 0, screened.output
    assert screened.stderr == ""  # no progress with --json
    assert [row["status"] for row in json.loads(screened.stdout)] == ["screened"]

    mixed = run_on(TEST_RUNTIME, "submit", str(good), str(broken), "--wait", "--timeout", "60")
    line = one_line_error(mixed, 1)
    assert line == "Error: 1 of 2 upload(s) failed (the error column says why)"
    assert "unsupported_format" in mixed.stdout
    assert "2 of 2 finished: 1 screened, 1 failed, 0 processing, 0 queued" in mixed.stderr


@pytest.mark.e2e
@pytest.mark.usefixtures("clean_db", "worker")
def test_a_stall_with_a_worker_but_no_message_names_lost_messages() -> None:
    with TEST_RUNTIME.session() as session:
        upload_ids = screening.submit_many(session, ["https://example.com/never-sent.jpg"])
    with TEST_RUNTIME.session() as session:
        stalled = tally(session, upload_ids)
    assert (stalled.total, stalled.queued) == (1, 1)
    cause = why_stalled(TEST_RUNTIME, stalled)
    assert cause.startswith(
        f"1 upload(s) are queued but queue {TEST_RUNTIME.settings.queue} has no message"
    )
    assert "`moderation sweep`" in cause


def test_bad_settings_are_one_line_naming_the_variables() -> None:
    # As an operator runs it: the command reads its settings from MODERATION_* variables.
    bad = {
        "MODERATION_BATCH_SIZE": "many",
        "MODERATION_MATCH_RADIUS": "5",
        "MODERATION_DATABASE_URL": "postgresql://u:hunter2@h/db",
    }
    line = one_line_from_process(bad, 1, "hits")
    assert line == (
        "Error: bad settings: MODERATION_BATCH_SIZE: Input should be a valid integer, unable "
        "to parse string as an integer; MODERATION_MATCH_RADIUS: Input should be less than "
        "or equal to 2"
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tallies = [Tally(total=3, queued=3), Tally(total=3, screened=1, processing=2),
               Tally(total=3, screened=2, failed=1)]  # fmt: skip
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = Progress(3, quiet=False)
    for t in tallies:
        bar.update(t)
    bar.close()
    drawn = terminal.getvalue()
    assert "2 screened, 1 failed" in drawn
    assert "3/3" in drawn
    assert "finished:" not in drawn  # no lines on a terminal

    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    lines = Progress(3, quiet=False)
    for t in tallies:
        lines.update(t)
    lines.close()
    # The first state at once, then at most every few seconds, and the last one always.
    assert pipe.getvalue().splitlines() == [
        "0 of 3 finished: 0 screened, 0 failed, 0 processing, 3 queued",
        "3 of 3 finished: 2 screened, 1 failed, 0 processing, 0 queued",
    ]

    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    silent = Progress(3, quiet=True)
    for t in tallies:
        silent.update(t)
    silent.close()
    assert quiet.getvalue() == ""
