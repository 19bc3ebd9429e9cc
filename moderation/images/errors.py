"""Typed intake errors. Each carries a stable code and a sentence a person can act on.

`BadInput` is final: the same bytes fail the same way every time, so it is stored on the
upload and never retried. `TransientFault` may succeed later and is retried with backoff.
"""

from __future__ import annotations

from moderation.errors import ModerationError


class IntakeError(ModerationError):
    code = "intake_error"

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadInput(IntakeError):
    code = "bad_input"
    # Where a request carried the bytes (an example image, a bank entry): they are wrong.
    status = 422


class TransientFault(IntakeError):
    code = "transient_fault"
    status = 503


# Fetching.
class NotFound(BadInput):
    code = "not_found"


class UnsupportedUri(BadInput):
    code = "unsupported_uri"


class UriRefused(BadInput):
    """The URI is outside what this service may fetch. One code and one kind of message
    for every reason, never saying whether a refused file exists."""

    code = "uri_refused"


class ContentMismatch(BadInput):
    """The bytes fetched are not the ones the submitter declared (their SHA-256 differs)."""

    code = "content_mismatch"


class FetchRefused(BadInput):
    code = "fetch_refused"


class FetchTimeout(TransientFault):
    code = "fetch_timeout"


class FetchUnavailable(TransientFault):
    code = "fetch_unavailable"


# Decoding.
class EmptyFile(BadInput):
    code = "empty_file"


class FileTooLarge(BadInput):
    code = "file_too_large"


class UnsupportedFormat(BadInput):
    code = "unsupported_format"


class DecompressionBomb(BadInput):
    code = "decompression_bomb"


class BadDimensions(BadInput):
    code = "bad_dimensions"


class TruncatedImage(BadInput):
    code = "truncated_image"


class CorruptImage(BadInput):
    code = "corrupt_image"
