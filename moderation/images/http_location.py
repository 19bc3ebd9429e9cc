"""The parts of an http(s) URI that the fetch policy judges, parsed as httpx parses them.

httpx's parser decides where the fetcher connects, so the policy must read URIs the same
way. It is also the most expensive part of a check (about 12 us a URI; `POST /v1/uploads`
checks up to a thousand per request), so URIs that are already in canonical form (lower
case scheme and host, no port httpx would drop, no user information, no percent
escapes, dot segments or fragment, only characters httpx leaves as they are) are read by
one regular expression instead. For those, every field below is what httpx gives:
`tests/test_http_location.py` holds the two paths to the same answers over generated
URIs. Anything else goes through httpx.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

import httpx

from moderation.images.errors import UriRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}

# Characters RFC 3986 allows in a path or query that httpx's quoting leaves alone; no `%`.
# The `-` is escaped: the query's class adds `?` after it, and "/-?" would be a range that
# takes in `<` and `>`, which httpx quotes.
_PCHARS = r"A-Za-z0-9._~!$&'()*+,;=:@/\-"
_CANONICAL = re.compile(
    r"(?P<scheme>https?)://"
    r"(?P<host>[a-z0-9-]+(?:\.[a-z0-9-]+)*)"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?"
    rf"(?P<path>/[{_PCHARS}]*)"
    rf"(?P<query>\?[{_PCHARS}?]*)?"
)
# Hosts that httpx reads as IPv4 addresses, and checks as such.
_DOTTED_DIGITS = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")


@dataclass(frozen=True)
class HttpLocation:
    # The URI as it is stored and fetched: httpx's string for it, fragment dropped.
    canonical: str
    scheme: str
    # The host as httpx gives it (IDNA names decoded; IPv6 without brackets), and as sent
    # to the resolver (IDNA names encoded).
    host: str
    raw_host: str
    # None where httpx gives none: no port, or the scheme's default.
    port: int | None
    # The path without the query, "/" when empty; still percent-encoded.
    path: str
    has_userinfo: bool

    @property
    def host_key(self) -> str:
        return self.host.lower().rstrip(".")

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS.get(self.scheme, 0)

    @property
    def address(self) -> IPAddress | None:
        """The host as an address, where it is one: judged as it is, nothing to resolve."""
        return address_literal(self.host)


def parse_http(uri: str) -> HttpLocation:
    """`uri`'s parts as httpx reads them, or `UriRefused` where httpx cannot read it."""
    return _parse_canonical(uri) or _parse_with_httpx(uri)


def _parse_canonical(uri: str) -> HttpLocation | None:
    match = _CANONICAL.fullmatch(uri)
    if match is None:
        return None
    scheme, host, port_text, path = match.group("scheme", "host", "port", "path")
    port = int(port_text) if port_text else None
    if port is not None and (port > 65535 or port == DEFAULT_PORTS[scheme]):
        return None  # httpx refuses the one and drops the other from its string
    if "xn--" in host:
        return None  # IDNA labels, which httpx checks by IDNA's rules
    if _DOTTED_DIGITS.fullmatch(host) and not _is_plain_ipv4(host):
        return None  # what httpx refuses as an address, or writes differently
    if "/." in path:
        return None  # dot segments, which httpx removes
    return HttpLocation(
        canonical=uri,
        scheme=scheme,
        host=host,
        raw_host=host,
        port=port,
        path=path,
        has_userinfo=False,
    )


@lru_cache(maxsize=4096)
def address_literal(host: str) -> IPAddress | None:
    """`host` as an IP address, or None for a name. Cached: parsing costs microseconds, and
    a batch of uploads names the same few hosts again and again."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _is_plain_ipv4(host: str) -> bool:
    address = address_literal(host)
    return isinstance(address, ipaddress.IPv4Address) and str(address) == host


def _parse_with_httpx(uri: str) -> HttpLocation:
    try:
        url = httpx.URL(uri)
        if "#" in uri:
            url = url.copy_with(fragment=None)
    except httpx.InvalidURL:
        raise UriRefused("the URI is not a valid http(s) URL") from None
    return HttpLocation(
        canonical=str(url),
        scheme=url.scheme,
        host=url.host,
        raw_host=url.raw_host.decode("ascii"),
        port=url.port,
        path=url.raw_path.split(b"?", 1)[0].decode("ascii") or "/",
        has_userinfo=bool(url.userinfo),
    )
