"""The `moderation` command line, run in-process through Click's test runner.

Commands commit their own transactions, so tests that write use `clean_db`, not `session`.
`submit` leaves its messages on a queue of the test's own, which no worker consumes.
"""

from __future__ import annotations

import json
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from click.testing import CliRunner, Result
from sqlalchemy import select
from transformers import AutoTokenizer, CLIPModel

from moderation.audit import service as audit
from moderation.banks.models import BankEntry, BankEntryEmbedding
from moderation.embedding.clip import processor_class
from moderation.embedding.service import vector_from_bytes
from moderation.images.http_location import IPAddress
from moderation.main.cli import main
from moderation.runtime import Runtime
from moderation.screening import service as screening
from moderation.screening.cli import SUBMIT_CHUNK
from tests.conftest import TEST_RUNTIME
from tests.images import encode, textured, write
from tests.queues import queue, queue_runtime, queued_uploads

__all__ = ["queue", "queue_runtime"]

SHA256_HEX = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
PDQ_HEX = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"


def invoke_on(runtime: Runtime, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), obj=runtime)


def invoke(*args: str) -> Result:
    return invoke_on(TEST_RUNTIME, *args)


def cli_on(runtime: Runtime, *args: str) -> Any:
    """Run a command on `runtime` that must succeed; its JSON parsed when asked for with
    --json."""
    result = CliRunner().invoke(main, list(args), obj=runtime, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result.output


def cli(*args: str) -> Any:
    return cli_on(TEST_RUNTIME, *args)


def fails_on(runtime: Runtime, *args: str, exit_code: int = 1) -> str:
    """Run a command on `runtime` that must fail cleanly (a Click error, no traceback); its
    output."""
    result = invoke_on(runtime, *args)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == exit_code, result.output
    assert "Error:" in result.output
    assert "Traceback" not in result.output
    return result.output


def fails(*args: str, exit_code: int = 1) -> str:
    return fails_on(TEST_RUNTIME, *args, exit_code=exit_code)


def entry_counts() -> dict[str, int]:
    return {b["name"]: b["entries"] for b in cli("bank", "list", "--json")}


def projection_dim(tiny_model: Path) -> int:
    dim = json.loads((tiny_model / "config.json").read_text())["projection_dim"]
    assert isinstance(dim, int)
    return dim


# bank create


@pytest.mark.usefixtures("clean_db")
def test_bank_create_returns_the_bank() -> None:
    created = cli("bank", "create", "csam-hashes", "--radius", "0.1", "--json")
    assert set(created) == {"id", "name", "radius"}
    assert isinstance(created["id"], int)
    assert (created["name"], created["radius"]) == ("csam-hashes", 0.1)
    default = cli("bank", "create", "default-radius", "--json")
    assert default["radius"] is None  # the global radius applies
    assert default["id"] != created["id"]
    assert "created bank plain" in cli("bank", "create", "plain")


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("name", ["a/b", "x" * 201])
def test_bank_create_refuses_a_name_the_api_could_not_address(name: str) -> None:
    # The API names banks in paths (`/v1/banks/{name}`): a name it refuses is refused here.
    output = fails("bank", "create", name)
    assert "a bank name is 1 to 200 characters without '/'" in output
    assert cli("bank", "list", "--json") == []


@pytest.mark.usefixtures("clean_db")
def test_bank_create_refuses_a_name_that_exists() -> None:
    first = cli("bank", "create", "twice", "--json")
    output = fails("bank", "create", "twice", "--radius", "0.2")
    assert "a bank named 'twice' already exists" in output
    (bank,) = cli("bank", "list", "--json")
    assert (bank["id"], bank["radius"]) == (first["id"], None)  # the first one, unchanged


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("radius", ["5", "-0.1", "2.0001", "nan"])
def test_bank_create_refuses_a_radius_outside_0_to_2(radius: str) -> None:
    output = fails("bank", "create", "wide", "--radius", radius)
    assert "radius is a cosine distance between 0 and 2" in output
    assert cli("bank", "list", "--json") == []


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("radius", ["0", "2"])
def test_bank_create_accepts_the_ends_of_the_radius_range(radius: str) -> None:
    assert cli("bank", "create", "edge", "--radius", radius, "--json")["radius"] == float(radius)


# bank add: hashes


@pytest.mark.usefixtures("clean_db")
def test_bank_add_hashes_returns_one_entry_each_with_the_same_hex() -> None:
    cli("bank", "create", "hashes")
    other_sha = "00" * 31 + "ff"
    added = cli(
        "bank", "add", "hashes",
        "--sha256", SHA256_HEX, "--sha256", other_sha.upper(), "--pdq", PDQ_HEX,
        "--added-by", "analyst-7", "--json",
    )  # fmt: skip
    assert len(added) == 3
    assert len({a["id"] for a in added}) == 3
    assert all(isinstance(a["id"], int) and a["bank"] == "hashes" for a in added)
    sha_a, sha_b, pdq = added
    assert (sha_a["sha256"], sha_a["pdq"]) == (SHA256_HEX, None)
    assert sha_b["sha256"] == other_sha  # upper case in, canonical lower case out
    assert (pdq["pdq"], pdq["sha256"], pdq["pdq_quality"]) == (PDQ_HEX, None, None)
    assert not any(a["embedding"] for a in added)
    assert entry_counts() == {"hashes": 3}
    with TEST_RUNTIME.session() as session:
        stored = session.scalars(select(BankEntry).order_by(BankEntry.id)).all()
        assert [e.id for e in stored] == [a["id"] for a in added]
        assert stored[0].sha256 == bytes.fromhex(SHA256_HEX)
        assert stored[2].pdq == bytes.fromhex(PDQ_HEX)
        assert {e.added_by for e in stored} == {"analyst-7"}


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--sha256", SHA256_HEX[:-2], "SHA-256 must be 64 hex digits, got 62"),
        ("--sha256", SHA256_HEX + "00", "SHA-256 must be 64 hex digits, got 66"),
        ("--sha256", "g" + SHA256_HEX[1:], "SHA-256 is not hexadecimal"),
        ("--pdq", PDQ_HEX[:10], "PDQ must be 64 hex digits, got 10"),
        ("--pdq", "zz" + PDQ_HEX[2:], "PDQ is not hexadecimal"),
    ],
)
def test_bank_add_refuses_a_malformed_hash(option: str, value: str, problem: str) -> None:
    cli("bank", "create", "hashes")
    # A good hash beside the bad one: nothing of the command is kept.
    output = fails("bank", "add", "hashes", "--sha256", "ab" * 32, option, value)
    assert problem in output
    assert value in output
    assert entry_counts() == {"hashes": 0}


# bytes.fromhex() skips whitespace, so a 64-character value with spaces inside would be
# a 22-byte "hash"; a short PDQ would break the bank index for every worker.
@pytest.mark.usefixtures("clean_db")
def test_bank_add_refuses_a_hash_with_whitespace_inside() -> None:
    cli("bank", "create", "hashes")
    spaced = "ab " * 20 + "abab"  # 64 characters, 22 bytes
    assert len(spaced) == 64
    result = invoke("bank", "add", "hashes", "--pdq", spaced, "--json")
    assert result.exit_code == 1, result.output
    assert entry_counts() == {"hashes": 0}


@pytest.mark.usefixtures("clean_db")
def test_bank_add_to_a_bank_that_does_not_exist_fails_saying_so() -> None:
    output = fails("bank", "add", "nowhere", "--sha256", SHA256_HEX)
    assert "no bank named 'nowhere'" in output
    assert "moderation bank create nowhere" in output
    assert cli("bank", "list", "--json") == []


@pytest.mark.usefixtures("clean_db")
def test_bank_add_with_nothing_to_add_is_a_usage_error() -> None:
    cli("bank", "create", "empty")
    output = fails("bank", "add", "empty", exit_code=2)
    assert "give IMAGES, --embedding, --pdq or --sha256" in output
    assert entry_counts() == {"empty": 0}


# bank add: embeddings


@pytest.mark.usefixtures("clean_db")
def test_bank_add_embedding_matrix_creates_one_entry_per_row(
    tmp_path: Path, tiny_model: Path
) -> None:
    dim = projection_dim(tiny_model)
    vectors = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32) * 7
    np.save(tmp_path / "partner.npy", vectors)
    cli("bank", "create", "shared")

    added = cli(
        "bank", "add", "shared", "--embedding", str(tmp_path / "partner.npy"),
        "--source-ref", "vault://case-12", "--json",
    )  # fmt: skip

    assert len(added) == 3
    assert len({a["id"] for a in added}) == 3
    assert all(a["embedding"] and a["sha256"] is None and a["pdq"] is None for a in added)
    assert {a["source_ref"] for a in added} == {"vault://case-12"}
    assert entry_counts() == {"shared": 3}
    with TEST_RUNTIME.session() as session:
        stored = session.scalars(
            select(BankEntryEmbedding).order_by(BankEntryEmbedding.bank_entry_id)
        ).all()
        assert [s.bank_entry_id for s in stored] == [a["id"] for a in added]
        got = np.stack([vector_from_bytes(s.vector) for s in stored])
    # Stored L2-normalised, in the order of the rows.
    expected = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.usefixtures("clean_db")
def test_bank_add_single_embedding_creates_one_entry(tmp_path: Path, tiny_model: Path) -> None:
    np.save(tmp_path / "one.npy", np.ones(projection_dim(tiny_model), dtype=np.float32))
    cli("bank", "create", "one")
    (entry,) = cli("bank", "add", "one", "--embedding", str(tmp_path / "one.npy"), "--json")
    assert entry["embedding"] is True
    assert entry_counts() == {"one": 1}


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize("shape", [(16,), (2, 33)])
def test_bank_add_refuses_an_embedding_of_the_wrong_dimension(
    tmp_path: Path, tiny_model: Path, shape: tuple[int, ...]
) -> None:
    assert projection_dim(tiny_model) not in shape
    np.save(tmp_path / "wrong.npy", np.ones(shape, dtype=np.float32))
    cli("bank", "create", "shared")
    output = fails("bank", "add", "shared", "--embedding", str(tmp_path / "wrong.npy"))
    assert f"embedding has shape ({shape[-1]},)" in output
    assert f"produces ({projection_dim(tiny_model)},)" in output
    assert entry_counts() == {"shared": 0}


@pytest.mark.usefixtures("clean_db")
def test_bank_add_refuses_a_zero_embedding(tmp_path: Path, tiny_model: Path) -> None:
    vectors = np.ones((2, projection_dim(tiny_model)), dtype=np.float32)
    vectors[1] = 0
    np.save(tmp_path / "zero.npy", vectors)
    cli("bank", "create", "shared")
    output = fails("bank", "add", "shared", "--embedding", str(tmp_path / "zero.npy"))
    assert "embeddings must be finite and non-zero" in output
    assert entry_counts() == {"shared": 0}  # not even the good row


@pytest.mark.usefixtures("clean_db")
def test_bank_add_refuses_an_embedding_file_that_is_missing(tmp_path: Path) -> None:
    cli("bank", "create", "shared")
    output = fails("bank", "add", "shared", "--embedding", str(tmp_path / "nope.npy"), exit_code=2)
    assert "does not exist" in output


# bank list


@pytest.mark.usefixtures("clean_db")
def test_bank_list_shows_entry_counts() -> None:
    assert cli("bank", "list", "--json") == []
    assert "no banks" in cli("bank", "list")
    cli("bank", "create", "b-two", "--radius", "0.3")
    cli("bank", "create", "a-none")
    cli("bank", "add", "b-two", "--sha256", SHA256_HEX, "--pdq", PDQ_HEX)

    listed = cli("bank", "list", "--json")

    assert [(b["name"], b["entries"], b["radius"], b["enabled"]) for b in listed] == [
        ("a-none", 0, None, True),
        ("b-two", 2, 0.3, True),
    ]
    table = cli("bank", "list")
    assert "ENTRIES" in table
    assert any(
        line.startswith(str(listed[1]["id"])) and "b-two" in line for line in table.split("\n")
    )


# embed


def test_embed_writes_a_unit_float32_vector_of_the_models_size(
    tmp_path: Path, tiny_model: Path
) -> None:
    image = write(tmp_path / "image.png", encode(textured(1), "PNG"))
    other = write(tmp_path / "other.png", encode(textured(2), "PNG"))

    output = cli("embed", str(image), "--out", str(tmp_path / "a.npy"))
    cli("embed", image.resolve().as_uri(), "--out", str(tmp_path / "b.npy"))
    cli("embed", str(other), "--out", str(tmp_path / "c.npy"))

    first, again, different = (np.load(tmp_path / f"{n}.npy") for n in "abc")
    dim = projection_dim(tiny_model)
    assert f"{dim}-d embedding" in output
    assert first.dtype == np.float32
    assert first.shape == (dim,)
    assert float(np.linalg.norm(first)) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, different)


def test_embed_of_a_text_file_named_jpg_fails_with_its_code(tmp_path: Path) -> None:
    text = write(tmp_path / "text.jpg", b"this is text, not a JPEG\n" * 20)
    output = fails("embed", str(text), "--out", str(tmp_path / "text.npy"))
    assert "unsupported_format" in output
    assert not (tmp_path / "text.npy").exists()


def test_embed_of_a_missing_file_fails_with_its_code(tmp_path: Path) -> None:
    output = fails("embed", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "m.npy"))
    assert "not_found" in output


# np.save appends ".npy" to a path that lacks it; the caller asked for exactly this path.
def test_embed_writes_exactly_the_out_path(tmp_path: Path) -> None:
    image = write(tmp_path / "image.png", encode(textured(3), "PNG"))
    cli("embed", str(image), "--out", str(tmp_path / "vector.bin"))
    assert (tmp_path / "vector.bin").exists()
    assert not (tmp_path / "vector.bin.npy").exists()


# model tiny


def test_model_tiny_writes_a_loadable_checkpoint_and_says_what_it_is(tmp_path: Path) -> None:
    directory = tmp_path / "tiny"

    output = cli("model", "tiny", str(directory), "--seed", "3")

    for name in (
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ):
        assert (directory / name).is_file(), name
    model: Any = CLIPModel.from_pretrained(str(directory))
    assert model.config.projection_dim == projection_dim(directory)
    assert AutoTokenizer.from_pretrained(str(directory))("a cat")["input_ids"]
    assert processor_class().from_pretrained(str(directory)).crop_size["height"] > 0
    assert f"MODERATION_MODEL={directory.resolve()}" in output
    assert "matches mean nothing beyond exact copies" in " ".join(output.split())


# submit, uploads, hits


@pytest.mark.usefixtures("clean_db")
def test_submit_of_a_directory_queues_the_images_inside(
    tmp_path: Path, queue: str, queue_runtime: Runtime, redis_client: redis.Redis
) -> None:
    folder = tmp_path / "inbox"
    images = [
        write(folder / "a.jpg", encode(textured(1))),
        write(folder / "nested" / "deeper" / "b.png", encode(textured(2), "PNG")),
        write(folder / "nested" / "c.WEBP", encode(textured(3), "WEBP")),
    ]
    write(folder / "notes.txt", b"not an image")
    write(folder / "nested" / "manifest.json", b"{}")
    write(folder / ".hidden.jpg", encode(textured(4)))

    submitted = cli_on(queue_runtime, "submit", str(folder), "--json")

    assert sorted(s["uri"] for s in submitted) == sorted(p.resolve().as_uri() for p in images)
    for row in submitted:
        assert set(row) == {"upload_id", "uri", "status", "error", "frames_hashed", "frame_count"}
        assert isinstance(row["upload_id"], int)
        assert (row["status"], row["error"]) == ("queued", None)
    assert len({s["upload_id"] for s in submitted}) == 3
    # Their messages wait for a worker: uploads sent together share messages.
    assert sorted(queued_uploads(redis_client, queue)) == sorted(s["upload_id"] for s in submitted)


@pytest.mark.usefixtures("clean_db")
def test_a_submission_larger_than_one_chunk_queues_everything_in_order(
    tmp_path: Path, queue: str, queue_runtime: Runtime, redis_client: redis.Redis
) -> None:
    image = write(tmp_path / "a.jpg", encode(textured(1)))
    count = SUBMIT_CHUNK * 2 + 1
    submitted = cli_on(queue_runtime, "submit", *[str(image)] * count, "--json")
    ids = [row["upload_id"] for row in submitted]
    assert len(set(ids)) == count  # one upload per argument, even of the same file
    assert ids == sorted(ids)
    assert queued_uploads(redis_client, queue) == ids
    assert redis_client.llen(queue) < count


@pytest.mark.usefixtures("clean_db")
def test_submit_resolves_each_host_once_for_all_its_uris(
    queue: str, queue_runtime: Runtime, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """URIs are checked once, all of them before any chunk is recorded; each chunk is not
    checked (and each host resolved) a second time."""
    from moderation.images import uri_policy

    lookups: list[str] = []

    def counted(host: str, timeout_s: float) -> list[IPAddress]:
        lookups.append(host)
        return [ip_address("93.184.215.14")]  # a public address, so the policy allows it

    monkeypatch.setattr(uri_policy, "_resolve", counted)
    uris = [f"https://cdn.example.com/{i}.jpg" for i in range(SUBMIT_CHUNK + 1)]
    submitted = cli_on(queue_runtime, "submit", *uris, "--json")
    assert lookups == ["cdn.example.com"]
    assert queued_uploads(redis_client, queue) == [row["upload_id"] for row in submitted]


@pytest.mark.usefixtures("clean_db")
def test_submit_of_nothing_but_non_images_is_a_usage_error(
    tmp_path: Path, queue_runtime: Runtime
) -> None:
    write(tmp_path / "only" / "notes.txt", b"not an image")
    output = fails_on(queue_runtime, "submit", str(tmp_path / "only"), exit_code=2)
    assert "no images found" in output
    assert cli_on(queue_runtime, "uploads", "--json") == []


@pytest.mark.usefixtures("clean_db")
def test_submit_external_id_with_two_images_is_a_usage_error(
    tmp_path: Path, queue_runtime: Runtime
) -> None:
    a = write(tmp_path / "a.jpg", encode(textured(1)))
    b = write(tmp_path / "b.jpg", encode(textured(2)))
    output = fails_on(
        queue_runtime, "submit", str(a), str(b), "--external-id", "post-1", exit_code=2
    )
    assert "--external-id and --sha256 name one upload" in output
    assert cli_on(queue_runtime, "uploads", "--json") == []


@pytest.mark.usefixtures("clean_db")
def test_submit_of_the_same_external_id_twice_returns_the_same_upload(
    tmp_path: Path, queue: str, queue_runtime: Runtime, redis_client: redis.Redis
) -> None:
    image = write(tmp_path / "a.jpg", encode(textured(1)))

    (first,) = cli_on(queue_runtime, "submit", str(image), "--external-id", "post-42", "--json")
    (again,) = cli_on(queue_runtime, "submit", str(image), "--external-id", "post-42", "--json")
    (other,) = cli_on(queue_runtime, "submit", str(image), "--external-id", "post-43", "--json")

    assert again == first
    assert other["upload_id"] != first["upload_id"]
    assert redis_client.llen(queue) == 2  # the repeat sends no second message
    assert sorted(u["upload_id"] for u in cli_on(queue_runtime, "uploads", "--json")) == sorted(
        [first["upload_id"], other["upload_id"]]
    )


@pytest.mark.usefixtures("clean_db")
@pytest.mark.parametrize(
    "target",
    ["/etc/shadow", "/etc/no-such-file", "file:///proc/self/environ", "/root/.ssh/id_rsa"],
)
def test_submit_refuses_what_the_fetch_policy_refuses_without_saying_if_it_exists(
    target: str, queue: str, queue_runtime: Runtime, redis_client: redis.Redis
) -> None:
    output = fails_on(queue_runtime, "submit", target)
    assert "uri_refused" in output
    assert "MODERATION_ALLOWED_URI_PREFIXES" in output
    # The same words whether the file exists or not: only the path differs.
    assert output.replace(target, "TARGET") == fails_on(
        queue_runtime, "submit", "/etc/absent"
    ).replace("/etc/absent", "TARGET")
    assert cli_on(queue_runtime, "uploads", "--json") == []
    assert redis_client.llen(queue) == 0


@pytest.mark.usefixtures("clean_db")
def test_one_refused_uri_refuses_the_whole_submission(
    tmp_path: Path, queue_runtime: Runtime
) -> None:
    image = write(tmp_path / "a.jpg", encode(textured(1)))
    fails_on(queue_runtime, "submit", str(image), "/etc/passwd")
    assert cli_on(queue_runtime, "uploads", "--json") == []


@pytest.mark.usefixtures("clean_db")
def test_an_external_id_again_with_another_image_is_refused_as_a_conflict(
    tmp_path: Path, queue: str, queue_runtime: Runtime, redis_client: redis.Redis
) -> None:
    first_image = write(tmp_path / "a.jpg", encode(textured(1)))
    second_image = write(tmp_path / "b.jpg", encode(textured(2)))
    (first,) = cli_on(
        queue_runtime, "submit", str(first_image), "--external-id", "post-7", "--json"
    )

    other_uri = fails_on(queue_runtime, "submit", str(second_image), "--external-id", "post-7")
    assert f"already names upload {first['upload_id']}" in other_uri
    # The same path with other bytes behind it: a different image, also refused.
    first_image.write_bytes(encode(textured(3)))
    assert "bytes differ" in fails_on(
        queue_runtime, "submit", str(first_image), "--external-id", "post-7"
    )
    assert [u["upload_id"] for u in cli_on(queue_runtime, "uploads", "--json")] == [
        first["upload_id"]
    ]
    assert redis_client.llen(queue) == 1


@pytest.mark.usefixtures("clean_db")
def test_sha256_must_be_64_hex_digits(tmp_path: Path, queue_runtime: Runtime) -> None:
    image = write(tmp_path / "a.jpg", encode(textured(1)))
    assert "64 hexadecimal digits" in fails_on(
        queue_runtime, "submit", str(image), "--sha256", "abc", exit_code=2
    )


@pytest.mark.usefixtures("clean_db")
def test_resubmit_queues_a_failed_upload_again_and_refuses_others(
    tmp_path: Path, queue: str, queue_runtime: Runtime, redis_client: redis.Redis
) -> None:
    image = write(tmp_path / "a.jpg", encode(textured(1)))
    (failed, queued) = cli_on(queue_runtime, "submit", str(image), str(image), "--json")
    with TEST_RUNTIME.session() as session:
        screening.record_failed(session, failed["upload_id"], "fetch_timeout", "slow")
    redis_client.delete(queue)

    assert "is queued" in fails_on(queue_runtime, "resubmit", str(queued["upload_id"]))
    assert "no upload with id 999999999" in fails_on(queue_runtime, "resubmit", "999999999")
    (again,) = cli_on(queue_runtime, "resubmit", str(failed["upload_id"]), "--json")

    assert (again["upload_id"], again["status"], again["error"]) == (
        failed["upload_id"],
        "queued",
        None,
    )
    assert redis_client.llen(queue) == 1
    with TEST_RUNTIME.session() as session:
        (event,) = audit.events_for(session, "upload", failed["upload_id"])
    assert event.action == "upload.resubmit"
    assert event.actor.startswith("cli:")


@pytest.mark.usefixtures("clean_db")
def test_uploads_lists_submitted_uploads_newest_first(
    tmp_path: Path, queue_runtime: Runtime
) -> None:
    assert cli_on(queue_runtime, "uploads", "--json") == []
    assert "no uploads" in cli_on(queue_runtime, "uploads")
    a = write(tmp_path / "a.jpg", encode(textured(1)))
    b = write(tmp_path / "b.jpg", encode(textured(2)))
    submitted = cli_on(queue_runtime, "submit", str(a), str(b), "--json")

    listed = cli_on(queue_runtime, "uploads", "--json")

    assert [u["upload_id"] for u in listed] == sorted(
        (s["upload_id"] for s in submitted), reverse=True
    )
    assert {u["uri"] for u in listed} == {a.resolve().as_uri(), b.resolve().as_uri()}
    assert all(u["status"] == "queued" and u["attempts"] == 0 for u in listed)
    assert (
        cli_on(queue_runtime, "uploads", "--status", "queued", "--limit", "1", "--json")
        == listed[:1]
    )
    assert cli_on(queue_runtime, "uploads", "--status", "failed", "--json") == []


@pytest.mark.usefixtures("clean_db")
def test_hits_on_an_empty_database_is_an_empty_list() -> None:
    result = CliRunner().invoke(main, ["hits", "--json"], obj=TEST_RUNTIME, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "[]"
    assert "no hits" in cli("hits")


# db


def test_db_check_says_models_and_migrations_agree() -> None:
    output = cli("db", "check")
    assert "models and migrations agree" in output
    assert "drift" not in output


def test_an_unknown_command_is_a_usage_error() -> None:
    assert "No such command" in fails("screen", exit_code=2)
