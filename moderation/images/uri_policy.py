"""Which URIs the service may fetch: uploads name them, so they are untrusted input.

`file://` URIs and plain paths are allowed only under the directories listed as `file:///dir/`
prefixes, judged after symlinks and `..` are resolved, and a refusal never says whether the
file exists. `http(s)://` URIs must match a listed prefix, and every address their host
resolves to must be public (or inside `fetch_allowed_networks`; cloud metadata addresses
never). The fetcher applies the address rule again to each address it connects to, so a
DNS answer that changes between this check and the connection gains nothing.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import httpx

from moderation.config import Settings
from moderation.images.errors import (
    FetchTimeout,
    FetchUnavailable,
    IntakeError,
    UnsupportedUri,
    UriRefused,
)
from moderation.images.http_location import (
    HttpLocation,
    IPAddress,
    address_literal,
    parse_http,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

FILE_REFUSED = (
    "file:// URIs and paths are allowed only under the directories in "
    "MODERATION_ALLOWED_URI_PREFIXES"
)
PREFIX_REFUSED = "the URI matches none of the prefixes in MODERATION_ALLOWED_URI_PREFIXES"

# Instance metadata and platform endpoints that hand out credentials. Some are ordinary
# public or shared addresses (Azure's wire server, Alibaba's), so they are listed by name;
# none may be fetched even where an allowed network covers them.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.169.253",  # AWS DNS
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.170.23",  # AWS EKS pod identity
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure wire server
    )
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


@dataclass(frozen=True)
class UriPolicy:
    """The allow-list for fetching, built once from settings and shared by threads."""

    # Prefixes as configured: `file:///dir/` entries name directories, the rest URL prefixes.
    allowed_prefixes: tuple[str, ...]
    allowed_networks: tuple[IPNetwork, ...] = ()
    max_redirects: int = 5

    def __post_init__(self) -> None:
        # A mistyped prefix fails at start-up, not as a refusal of every upload.
        for prefix in self.allowed_prefixes:
            scheme = urlsplit(prefix).scheme.lower()
            if scheme == "file":
                try:
                    _local_path(prefix)
                except UriRefused:
                    raise ValueError(
                        f"MODERATION_ALLOWED_URI_PREFIXES: {prefix!r} is not a local directory"
                    ) from None
            elif scheme in ("http", "https"):
                try:
                    httpx.URL(prefix)
                except httpx.InvalidURL:
                    raise ValueError(
                        f"MODERATION_ALLOWED_URI_PREFIXES: {prefix!r} is not a valid URL"
                    ) from None
            else:
                raise ValueError(
                    f"MODERATION_ALLOWED_URI_PREFIXES: {prefix!r} is not a file://, http:// "
                    "or https:// prefix"
                )

    @classmethod
    def from_settings(cls, settings: Settings) -> UriPolicy:
        return cls(
            allowed_prefixes=tuple(settings.allowed_uri_prefixes),
            allowed_networks=tuple(
                ipaddress.ip_network(cidr, strict=False) for cidr in settings.fetch_allowed_networks
            ),
            max_redirects=settings.max_redirects,
        )

    def allowing_files(self, paths_or_uris: Iterable[str]) -> UriPolicy:
        """This policy, also allowing the directories of the local files named. For commands
        an operator runs on files of their own (`bank add`, `embed`): the shell already lets
        them read those; only what uploads name is untrusted. URLs stay under the rules."""
        directories = tuple(
            f"{_file_uri(os.path.dirname(os.path.realpath(_local_path(item))))}/"
            for item in paths_or_uris
            if urlsplit(item).scheme.lower() == "file" or _is_path(item)
        )
        return replace(self, allowed_prefixes=self.allowed_prefixes + directories)

    def check(self, uri_or_path: str, *, resolve_timeout_s: float = 5.0) -> str:
        """The canonical URI to store and fetch, or `UriRefused` naming the rule.

        For http(s) the host is resolved too (within `resolve_timeout_s`), so a name that
        points inside the network is refused before anything is queued.
        """
        return self._check(uri_or_path, {}, resolve_timeout_s)

    def check_all(
        self, uris_or_paths: Sequence[str], *, resolve_timeout_s: float = 5.0
    ) -> list[str | IntakeError]:
        """`check` for many URIs, each one's canonical form or refusal, in order. Each host
        name is resolved once, however many URIs name it: a batch of uploads mostly comes
        from one or two CDNs."""
        resolved: dict[str, IntakeError | None] = {}
        verdicts: list[str | IntakeError] = []
        for uri in uris_or_paths:
            try:
                verdicts.append(self._check(uri, resolved, resolve_timeout_s))
            except IntakeError as error:
                verdicts.append(error)
        return verdicts

    def _check(
        self, uri_or_path: str, resolved: dict[str, IntakeError | None], timeout_s: float
    ) -> str:
        """`check`, with `resolved` holding each host's refusal (None: allowed) as found so
        far by the URIs of the same call."""
        canonical, host = self._check_location(uri_or_path)
        if host is None:
            return canonical
        if host not in resolved:
            try:
                self.resolve(host, timeout_s=timeout_s)
            except IntakeError as error:
                resolved[host] = error
                raise
            resolved[host] = None
        refusal = resolved[host]
        if refusal is not None:
            raise refusal
        return canonical

    def check_location(self, uri_or_path: str) -> str:
        """Everything but DNS: scheme, prefix, and for files the resolved real path."""
        return self._check_location(uri_or_path)[0]

    def _check_location(self, uri_or_path: str) -> tuple[str, str | None]:
        """The canonical URI, and the host name still to resolve (None for files and for
        address literals, already judged here)."""
        # Split once: this runs for each URI of a batch, and `_is_path` would split again.
        scheme = urlsplit(uri_or_path).scheme.lower()
        if len(scheme) <= 1 or scheme == "file":  # a path (see `_is_path`), or a file URI
            return _file_uri(self.allowed_file(uri_or_path)[0]), None
        if scheme in ("http", "https"):
            location = self._check_http(uri_or_path)
            return location.canonical, location.raw_host if location.address is None else None
        raise UnsupportedUri(
            f"URI scheme {scheme!r} is not supported; use a path, file:// or http(s)://"
        )

    def allowed_file(self, uri_or_path: str) -> tuple[str, str]:
        """The real path of a file URI or path and the real allowed directory it lies in.

        Every refusal has the same message, so nothing tells an existing file from a
        missing one.
        """
        path = _local_path(uri_or_path)
        real = os.path.realpath(path)
        for directory in self._file_directories():
            if is_under(real, directory):
                return real, directory
        raise UriRefused(FILE_REFUSED)

    def resolve(self, host: str, *, timeout_s: float) -> list[IPAddress]:
        """The addresses `host` resolves to, each allowed, or a refusal naming why not.

        One refused address refuses them all: which one a connection would use is up to
        the resolver and the network, not to us.
        """
        addresses = _resolve(host, timeout_s)
        for address in addresses:
            self.check_address(address)
        return addresses

    def check_address(self, address: IPAddress) -> None:
        refusal = _address_refusal(address, self.allowed_networks)
        if refusal is not None:
            raise UriRefused(refusal)

    def _check_http(self, uri: str) -> HttpLocation:
        location = parse_http(uri)
        if location.has_userinfo:
            # `https://cdn.example.com@evil.org/` reads as one host and connects to another.
            raise UriRefused("URIs with user information (user@host) are not accepted")
        if not location.host:
            raise UriRefused("the URI has no host")
        if not any(_matches(location, prefix) for prefix in self._url_prefixes):
            raise UriRefused(PREFIX_REFUSED)
        if location.address is not None:
            self.check_address(location.address)
        return location

    def _file_directories(self) -> list[str]:
        # Resolved at each check: a directory may be mounted or relinked after start-up.
        return [
            os.path.realpath(_local_path(prefix))
            for prefix in self.allowed_prefixes
            if urlsplit(prefix).scheme.lower() == "file"
        ]

    @cached_property
    def _url_prefixes(self) -> list[HttpLocation]:
        # Parsed once per policy (the field is frozen): URL prefixes never change, unlike
        # the directories behind `file://` prefixes.
        return [
            parse_http(prefix)
            for prefix in self.allowed_prefixes
            if urlsplit(prefix).scheme.lower() in ("http", "https")
        ]


@lru_cache(maxsize=4096)
def _address_refusal(address: IPAddress, allowed_networks: tuple[IPNetwork, ...]) -> str | None:
    """Why `address` may not be fetched, or None. Cached: the properties behind it cost
    microseconds each, and a batch of uploads names the same few hosts again and again."""
    judged = _embedded_ipv4(address) or address
    if address in METADATA_ADDRESSES or judged in METADATA_ADDRESSES:
        return "the host resolves to a cloud metadata address, never fetched"
    if any(judged in net or address in net for net in allowed_networks):
        return None
    kind = non_public_kind(judged)
    if kind is not None:
        return (
            f"the host resolves to a non-public address ({kind}); set "
            "MODERATION_FETCH_ALLOWED_NETWORKS to fetch from it"
        )
    return None


def non_public_kind(address: IPAddress) -> str | None:
    """Why `address` is not a public unicast address, or None if it is one."""
    for kind, test in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("shared", address in _SHARED),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("not globally routable", not address.is_global),
    ):
        if test:
            return kind
    return None


def is_under(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory and path != directory


def _is_path(uri_or_path: str) -> bool:
    # A one-letter "scheme" is a Windows drive, not a URI.
    return len(urlsplit(uri_or_path).scheme) <= 1


def _local_path(uri_or_path: str) -> str:
    """The local path a file URI or a path names, as given: nothing resolved yet."""
    if _is_path(uri_or_path):
        path = uri_or_path
    else:
        parts = urlsplit(uri_or_path)
        if parts.netloc.lower() not in ("", "localhost") or parts.query or parts.fragment:
            raise UriRefused(FILE_REFUSED)
        # Percent-decoded to bytes: file names need not be UTF-8 (`Path.as_uri` encodes them so).
        path = os.fsdecode(unquote_to_bytes(parts.path)) or "/"
        if not path.startswith("/"):
            raise UriRefused(FILE_REFUSED)
    if "\0" in path:
        raise UriRefused(FILE_REFUSED)
    # Not normalised here: `realpath` takes `..` after the symlink before it, as opening does.
    return path


def _file_uri(real_path: str) -> str:
    return Path(real_path).as_uri()


def _matches(url: HttpLocation, prefix: HttpLocation) -> bool:
    """Compared by parsed parts, not as strings: `https://cdn.example.com.evil.org/` does not
    start with `https://cdn.example.com/` here."""
    if url.scheme != prefix.scheme:
        return False
    if not prefix.host:
        return True
    if url.host_key != prefix.host_key or url.effective_port != prefix.effective_port:
        return False
    path, prefix_path = url.path, prefix.path
    if prefix_path == "/":
        return True
    # Under a path prefix, refuse what a server might decode into another directory:
    # `/images/%2e%2e/admin`, `/images/..%2F..%2Fadmin`, backslashes.
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in unquote(path):
        return False
    if any(segment in (".", "..") for segment in unquote(path).split("/")):
        return False
    return path.startswith(prefix_path)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to, judged in its place."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _resolve(host: str, timeout_s: float) -> list[IPAddress]:
    """Resolve within `timeout_s`: getaddrinfo takes no timeout, so it runs on a thread
    of its own, left to finish alone if the resolver hangs."""
    literal = address_literal(host)
    if literal is not None:
        return [literal]
    answer: list[str] = []
    failed: list[bool] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            answer.extend(str(sockaddr[0]) for *_, sockaddr in infos)
        except (OSError, UnicodeError):
            failed.append(True)

    thread = threading.Thread(target=lookup, name="resolve", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0))
    if thread.is_alive():
        raise FetchTimeout(f"resolving the host took longer than {timeout_s:g} s")
    if failed or not answer:
        raise FetchUnavailable("the host name could not be resolved")
    addresses: list[IPAddress] = []
    for text in answer:
        # An IPv6 link-local answer carries its interface: `fe80::1%eth0`.
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses
