"""The URI policy on the real file system and real addresses: what may be fetched at all.

The test environment allows files under the temporary directory and http(s) to 127.0.0.1
(conftest); tests that need other rules build their policy here.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from moderation.config import Settings
from moderation.images import errors
from moderation.images.http_location import IPAddress
from moderation.images.uri_policy import FILE_REFUSED, PREFIX_REFUSED, UriPolicy
from tests.conftest import TEST_SETTINGS


def default_policy() -> UriPolicy:
    """The policy of a deployment that configured nothing (no environment read)."""
    return UriPolicy.from_settings(Settings.model_construct())


def env_policy() -> UriPolicy:
    return UriPolicy.from_settings(TEST_SETTINGS)


def refusal(policy: UriPolicy, uri: str) -> str:
    with pytest.raises(errors.UriRefused) as caught:
        policy.check(uri)
    return caught.value.message


def test_default_settings_allow_no_local_files(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"abc")
    assert refusal(default_policy(), str(image)) == FILE_REFUSED
    assert refusal(default_policy(), image.as_uri()) == FILE_REFUSED
    assert refusal(default_policy(), "/etc/passwd") == FILE_REFUSED


@pytest.mark.parametrize(
    ("existing", "missing"),
    [
        ("/etc/passwd", "/etc/passwd-absent"),
        ("/etc/shadow", "/etc/shadow-absent"),
        ("file:///proc/self/environ", "file:///proc/self/environ-absent"),
        ("file:///etc/hostname", "file:///etc/no-such-host-file"),
        ("/etc", "/etc-absent/"),
    ],
)
def test_refusals_never_tell_whether_a_file_exists(existing: str, missing: str) -> None:
    assert os.path.exists(existing.removeprefix("file://"))
    assert refusal(env_policy(), existing) == refusal(env_policy(), missing) == FILE_REFUSED


def test_a_secret_next_to_the_allowed_directory_is_not_told_apart(tmp_path: Path) -> None:
    (tmp_path / "uploads").mkdir()
    secrets = tmp_path / "home" / ".ssh"
    secrets.mkdir(parents=True)
    (secrets / "id_rsa").write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    policy = UriPolicy(allowed_prefixes=(f"{(tmp_path / 'uploads').as_uri()}/",))
    answers = {
        refusal(policy, uri)
        for uri in [
            str(secrets / "id_rsa"),
            str(secrets / "nonexistent"),
            str(secrets),
            (secrets / "id_rsa").as_uri(),
            f"{tmp_path}/uploads/../home/.ssh/id_rsa",
            f"{tmp_path}/uploads/../home/.ssh/nonexistent",
        ]
    }
    assert answers == {FILE_REFUSED}


def test_files_are_judged_after_resolving_symlinks_and_dots(tmp_path: Path) -> None:
    policy = env_policy()
    (tmp_path / "to-passwd").symlink_to("/etc/passwd")
    (tmp_path / "to-etc").symlink_to("/etc")
    depth = len(tmp_path.parts) - 1  # up to /: 4 under plain pytest, 5 under xdist
    for uri in [
        str(tmp_path / "to-passwd"),
        (tmp_path / "to-passwd").as_uri(),
        str(tmp_path / "to-etc" / "passwd"),
        f"{tmp_path}/{'../' * depth}etc/passwd",
        f"{tmp_path.as_uri()}/{'%2e%2E/' * depth}etc/passwd",
        f"{tmp_path.as_uri()}/{'..%2F' * depth}etc/passwd",
    ]:
        assert refusal(policy, uri) == FILE_REFUSED, uri


def test_file_uris_must_be_plain_and_local(tmp_path: Path) -> None:
    policy = env_policy()
    image = tmp_path / "a.jpg"
    image.write_bytes(b"abc")
    for uri in [
        f"file://evil.org{image}",
        f"file://127.0.0.1{image}",
        f"{image.as_uri()}%00.png",
        f"{image}\0.png",
        f"{image.as_uri()}?x=1",
        f"{image.as_uri()}#x",
        "file:relative/a.jpg",
    ]:
        assert refusal(policy, uri) == FILE_REFUSED, uri
    assert policy.check(f"file://localhost{image}") == image.as_uri()


def test_allowed_files_get_their_real_path_as_canonical_uri(tmp_path: Path) -> None:
    policy = env_policy()
    real = tmp_path / "real dir" / "a é.jpg"
    real.parent.mkdir()
    real.write_bytes(b"abc")
    (tmp_path / "alias.jpg").symlink_to(real)
    assert policy.check(str(tmp_path / "alias.jpg")) == real.as_uri()
    assert policy.check(f"{tmp_path}/real dir/../real dir/a é.jpg") == real.as_uri()
    assert policy.check(real.as_uri()) == real.as_uri()
    # Inside an allowed directory a missing file is not refused: the fetch says not_found.
    assert policy.check(str(tmp_path / "absent.jpg")) == (tmp_path / "absent.jpg").as_uri()


def test_an_allowed_directory_is_resolved_too(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.jpg").write_bytes(b"abc")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    policy = UriPolicy(allowed_prefixes=(f"{(tmp_path / 'linked').as_uri()}/",))
    assert policy.check(str(tmp_path / "real" / "a.jpg")) == (tmp_path / "real/a.jpg").as_uri()
    assert policy.check(str(tmp_path / "linked" / "a.jpg")) == (tmp_path / "real/a.jpg").as_uri()
    # A sibling whose name starts like the directory's is not inside it.
    (tmp_path / "realx").mkdir()
    assert refusal(policy, str(tmp_path / "realx" / "a.jpg")) == FILE_REFUSED
    # The directory itself is not a file under it.
    assert refusal(policy, str(tmp_path / "real")) == FILE_REFUSED


CDN = UriPolicy(allowed_prefixes=("https://cdn.example.com/images/",))


@pytest.mark.parametrize(
    "uri",
    [
        "https://cdn.example.com.evil.org/images/a.jpg",
        "https://cdn.example.com@evil.org/images/a.jpg",
        "https://cdn.example.com:443@evil.org/images/a.jpg",
        "https://evil.org/https://cdn.example.com/images/a.jpg",
        "https://evil.org/?u=https://cdn.example.com/images/a.jpg",
        "https://evil.org/#https://cdn.example.com/images/a.jpg",
        "http://cdn.example.com/images/a.jpg",
        "https://cdn.example.com:8443/images/a.jpg",
        "https://cdn.example.com/imagesx/a.jpg",
        "https://cdn.example.com/images",
        "https://cdn.example.com/images/../admin/a.jpg",
        "https://cdn.example.com/images/%2e%2e/admin/a.jpg",
        "https://cdn.example.com/images/..%2Fadmin/a.jpg",
        "https://cdn.example.com/images/..%5cadmin/a.jpg",
        "https://cdn.example.com/images\\..\\admin/a.jpg",
        "https://xn--cdn-example-com/images/a.jpg",
    ],
)
def test_url_prefixes_cannot_be_fooled(uri: str) -> None:
    with pytest.raises(errors.UriRefused):
        CDN.check(uri)


def test_url_prefixes_match_by_parsed_parts() -> None:
    # Without resolving (no DNS here): case, a trailing dot and the default port are
    # the same host; the fragment is dropped.
    for uri in [
        "https://CDN.Example.com/images/a.jpg",
        "https://cdn.example.com./images/a.jpg",
        "https://cdn.example.com:443/images/a.jpg#top",
    ]:
        assert CDN.check_location(uri).endswith("/images/a.jpg"), uri
    assert CDN.check_location("https://cdn.example.com/images/a%20b.jpg?w=1") == (
        "https://cdn.example.com/images/a%20b.jpg?w=1"
    )
    assert refusal(CDN, "https://cdn.example.com.evil.org/images/a.jpg") == PREFIX_REFUSED


def test_user_information_is_refused_even_on_an_allowed_host() -> None:
    assert "user information" in refusal(default_policy(), "https://user:pw@8.8.8.8/a.jpg")


def test_an_operators_own_files_can_be_allowed_and_nothing_else(tmp_path: Path) -> None:
    """`bank add` and `embed` read files the operator names on their command line."""
    image = tmp_path / "banked" / "a.jpg"
    image.parent.mkdir()
    image.write_bytes(b"abc")
    policy = default_policy().allowing_files([str(image), "https://example.com/b.jpg"])
    assert policy.check_location(str(image)) == image.resolve().as_uri()
    assert refusal(policy, str(tmp_path / "elsewhere.jpg")) == FILE_REFUSED
    assert refusal(policy, "/etc/passwd") == FILE_REFUSED
    assert policy.allowed_networks == default_policy().allowed_networks


def test_other_schemes_are_unsupported() -> None:
    for uri in ["s3://bucket/key.jpg", "ftp://8.8.8.8/a.jpg", "gopher://127.0.0.1:6379/_x"]:
        with pytest.raises(errors.UnsupportedUri):
            default_policy().check(uri)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "shared"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("198.51.100.7", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "private"),
        # IPv6 forms that carry an IPv4 address are judged as that address.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::127.0.0.1", "loopback"),
        ("64:ff9b::a00:1", "private"),
        ("2002:7f00:1::", "loopback"),
    ],
)
def test_non_public_addresses_are_refused_by_kind(address: str, kind: str) -> None:
    host = f"[{address}]" if ":" in address else address
    message = refusal(default_policy(), f"http://{host}:8080/a.jpg")
    assert message == (
        f"the host resolves to a non-public address ({kind}); set "
        "MODERATION_FETCH_ALLOWED_NETWORKS to fetch from it"
    )


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.170.2",
        "fd00:ec2::254",
        "100.100.100.200",
        "192.0.0.192",
        "168.63.129.16",
        "::ffff:169.254.169.254",
    ],
)
def test_metadata_addresses_are_refused_even_inside_allowed_networks(address: str) -> None:
    everything = UriPolicy(
        allowed_prefixes=("http://",),
        allowed_networks=(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")),
    )
    host = f"[{address}]" if ":" in address else address
    assert "cloud metadata" in refusal(everything, f"http://{host}/latest/meta-data/")


def test_allowed_networks_open_private_addresses() -> None:
    store = UriPolicy(
        allowed_prefixes=("http://",), allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    assert store.check("http://10.1.2.3:9000/bucket/a.jpg") == "http://10.1.2.3:9000/bucket/a.jpg"
    store.check("http://[::ffff:10.1.2.3]:9000/bucket/a.jpg")
    assert "(private)" in refusal(store, "http://192.168.0.1/a.jpg")
    # The test environment's network is one address: its loopback neighbour stays refused.
    assert env_policy().check("http://127.0.0.1:6379/") == "http://127.0.0.1:6379/"
    assert "(loopback)" in refusal(env_policy(), "http://127.0.0.2:6379/")


def test_public_addresses_are_allowed() -> None:
    assert default_policy().check("http://8.8.8.8/a.jpg") == "http://8.8.8.8/a.jpg"
    default_policy().check("https://[2606:4700:4700::1111]/a.jpg")


def test_redis_on_loopback_is_refused_by_default() -> None:
    assert "(loopback)" in refusal(default_policy(), "http://127.0.0.1:6379/")
    assert "(loopback)" in refusal(default_policy(), "http://127.0.0.1:5432/")


@pytest.mark.parametrize("host", ["localhost", "LocalHost", "2130706434", "0x7f.0.0.2", "127.2"])
def test_names_are_judged_by_what_they_resolve_to(host: str) -> None:
    assert "(loopback)" in refusal(default_policy(), f"http://{host}:8080/a.jpg")


def test_settings_are_read_and_checked() -> None:
    policy = env_policy()
    assert policy.allowed_networks == (ipaddress.ip_network("127.0.0.1/32"),)
    assert policy.max_redirects == 5
    assert "http://" in policy.allowed_prefixes
    for prefix in ["s3://bucket/", "ftp://", "/data/uploads", "file://server/share/"]:
        with pytest.raises(ValueError, match="MODERATION_ALLOWED_URI_PREFIXES"):
            UriPolicy(allowed_prefixes=(prefix,))


def test_temporary_directory_really_exists_for_these_tests() -> None:
    # The refusals above mean something only if the allowed directory is a real one.
    assert any(
        os.path.isdir(prefix.removeprefix("file://"))
        for prefix in env_policy().allowed_prefixes
        if prefix.startswith("file://")
    )


def test_checking_a_batch_answers_each_uri_in_order_and_resolves_each_host_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `POST /v1/uploads` relies on: one refused URI is named by its position, and a
    hundred URIs on one CDN cost one DNS lookup, not a hundred."""
    from moderation.images import uri_policy

    lookups: list[str] = []
    real_resolve = uri_policy._resolve

    def counted(host: str, timeout_s: float) -> list[IPAddress]:
        lookups.append(host)
        return real_resolve(host, timeout_s)

    monkeypatch.setattr(uri_policy, "_resolve", counted)
    policy = UriPolicy(("https://", f"{tmp_path.as_uri()}/"))
    image = tmp_path / "a.jpg"
    uris = [
        "https://93.184.215.14/a.jpg",
        *(f"https://localhost/{i}.jpg" for i in range(50)),
        "https://93.184.215.14/b.jpg#fragment",
        "/etc/passwd",
        str(image),
        "gopher://example.com/",
    ]
    verdicts = policy.check_all(uris)
    assert lookups == ["localhost"]
    assert verdicts[0] == "https://93.184.215.14/a.jpg"
    assert all(isinstance(v, errors.UriRefused) for v in verdicts[1:51])
    assert "non-public address (loopback)" in str(verdicts[1])
    assert verdicts[51] == "https://93.184.215.14/b.jpg"
    assert isinstance(verdicts[52], errors.UriRefused)
    assert verdicts[52].message == FILE_REFUSED
    assert verdicts[53] == image.as_uri()
    assert isinstance(verdicts[54], errors.UnsupportedUri)
    # One at a time, the same answers.
    for uri, verdict in zip(uris, verdicts, strict=True):
        if isinstance(verdict, str):
            assert policy.check(uri) == verdict
        else:
            with pytest.raises(type(verdict)):
                policy.check(uri)
