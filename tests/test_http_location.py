"""The policy's reading of http(s) URIs: the fast path for canonical URIs must give exactly
what httpx's parser gives, because httpx decides where the fetcher connects."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moderation.images.errors import UriRefused
from moderation.images.http_location import (
    HttpLocation,
    _parse_canonical,
    _parse_with_httpx,
    parse_http,
)

# Characters a URI may be built from, canonical or not: the fast path's own alphabet and
# what it must send to httpx (case, escapes, brackets, spaces, non-ASCII, separators).
_ALPHABET = st.sampled_from(list("abcXYZ019.-_~!$&'()*+,;=:@/?#%[] \\\"<>^`{|}é\u0130\u212a"))
_HOSTS = st.one_of(
    st.sampled_from(
        [
            "cdn.example.com",
            "CDN.example.com",
            "example.com.",
            "93.184.215.14",
            "093.184.215.14",
            "10.0.0.1",
            "1.2.3",
            "999.1.1.1",
            "0x7f.0.0.1",
            "127.1",
            "[::1]",
            "xn--bcher-kva.example",
            "b\u00fccher.example",
            "a--b.example",
            "-a.example",
            "user@host.example",
            "",
        ]
    ),
    st.text(_ALPHABET, max_size=12),
)
_PORTS = st.one_of(
    st.just(""), st.sampled_from([":80", ":443", ":8080", ":0", ":08080", ":65535", ":65536"])
)


# Mostly what the fast path takes, so that both of its answers are exercised.
_PATHS = st.one_of(
    st.text(st.sampled_from(list("abcXYZ019._~!$&'()*+,;=:@/-")), max_size=24),
    st.text(_ALPHABET, max_size=24),
)


@st.composite
def uris(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https", "https", "HTTPS", "Http"]))
    path = "/" + draw(_PATHS)
    return f"{scheme}://{draw(_HOSTS)}{draw(_PORTS)}{path}"


def _httpx(uri: str) -> HttpLocation | str:
    try:
        return _parse_with_httpx(uri)
    except UriRefused as error:
        return str(error)


@settings(max_examples=3000, deadline=None)
@given(uris())
@example("https://93.184.215.14/bench/run/1.jpg")
@example("https://cdn.example.com:8443/a/b.jpg?size=large&v=2")
@example("https://cdn.example.com/a/./b.jpg")
@example("https://cdn.example.com/a/../b.jpg")
@example("https://cdn.example.com/.well-known/x")
@example("https://cdn.example.com:443/a")
@example("http://cdn.example.com:80/a")
@example("https://cdn.example.com:99999/a")
@example("https://127.0.0.1/a")
@example("https://999.0.0.1/a")
@example("https://cdn.example.com/a?b=c/d?e=f")
@example("http://cdn.example.com/?<")
def test_the_fast_path_reads_uris_as_httpx_does(uri: str) -> None:
    fast = _parse_canonical(uri)
    if fast is not None:
        assert fast == _httpx(uri)
        assert fast.canonical == uri
    # And whichever path a URI takes, the answer is httpx's.
    try:
        answer: HttpLocation | str = parse_http(uri)
    except UriRefused as error:
        answer = str(error)
    assert answer == _httpx(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "https://93.184.215.14/bench/run/1.jpg",
        "https://cdn.example.com/uploads/2026/11/a-b_c~d.jpg",
        "https://cdn.example.com:8443/a.jpg?sig=abc&exp=123",
    ],
)
def test_plain_upload_uris_take_the_fast_path(uri: str) -> None:
    """Were these to miss it, every check would pay httpx's parser again."""
    assert _parse_canonical(uri) is not None
