"""What the review pages show of an upload's content.

Kept evidence first (`moderation.evidence`): the frames screening saw, opened from the
vault, blurred here on the server unless a reviewer reveals them, so clear pixels reach
the browser only when asked for. An upload with no evidence and no hit (an analyst's
search result) is fetched again under the worker's URI policy and limits, and shown only
if its SHA-256 is the one screened; anything else is `ContentChanged`, never shown.
An upload with hits and no evidence is never fetched from a view (the uploader's server
would learn when a reviewer looks): the page says why there is nothing to see.
"""

from __future__ import annotations

from dataclasses import replace

from PIL import Image

from moderation.config import Settings
from moderation.errors import Conflict
from moderation.http.limits import FETCHES_SETTING, ApiLimits
from moderation.images.decode import DecodeLimits, decode
from moderation.images.fetch import fetch
from moderation.images.hashing import sha256
from moderation.images.thumbnails import blur, open_jpeg, shrink, strip, to_jpeg
from moderation.images.uri_policy import UriPolicy

# Height of each frame in an animation's strip, and the most frames it shows.
STRIP_HEIGHT = 72
STRIP_FRAMES = 16


class ContentChanged(Conflict):
    """The URI serves other bytes than those screened."""

    code = "content_changed"


def rendered(jpeg: bytes, *, reveal: bool) -> bytes:
    """A kept frame as the page shows it: as kept, or blurred."""
    return jpeg if reveal else to_jpeg(blur(open_jpeg(jpeg)))


def strip_of(jpegs: list[bytes], *, marked: int | None, reveal: bool) -> bytes:
    frames: list[Image.Image] = [open_jpeg(jpeg) for jpeg in jpegs]
    if not reveal:
        frames = [blur(frame) for frame in frames]
    return to_jpeg(strip(frames, STRIP_HEIGHT, marked))


def spread(frames: list[int], around: int, count: int = STRIP_FRAMES) -> list[int]:
    """At most `count` of the kept frames, evenly spread, always with `around` (the hit)."""
    if len(frames) <= count:
        return frames
    step = (len(frames) - 1) / (count - 1)
    chosen = {frames[round(i * step)] for i in range(count)} | {around}
    return sorted(chosen)


def fetched_thumbnail(
    uri: str,
    screened_sha256: bytes,
    settings: Settings,
    limits: ApiLimits,
    *,
    reveal: bool,
    caller: str = "",
) -> bytes:
    """A JPEG of the upload at `uri`, at most `settings.thumbnail_side` on its longer side,
    blurred unless `reveal`, if the URI still serves the bytes screened; fetched and decoded
    within this process's `limits` (the fetch counted against `caller`'s slots). Raises
    `ContentChanged`, `FetchesBusy`, or `IntakeError` as the worker would for the same URI."""
    side = settings.thumbnail_side
    with limits.fetches.taken(uri, setting=FETCHES_SETTING, party=caller):
        data = fetch(
            uri,
            policy=UriPolicy.from_settings(settings),
            max_bytes=settings.max_bytes,
            timeout_s=settings.fetch_timeout_s,
        )
    if sha256(data) != screened_sha256:
        raise ContentChanged(
            f"content changed since screening: the URI now serves SHA-256 {sha256(data).hex()}, "
            f"screened {screened_sha256.hex()}; nothing of it is shown"
        )
    # The first frame only; large JPEGs decode at a reduced scale no smaller than the thumbnail.
    decode_limits = replace(
        DecodeLimits.from_settings(settings),
        max_frames=1,
        max_hashed_frames=1,
        decode_min_side=side,
    )
    decoded = decode(
        data, decode_limits, lambda frame, _sampled: shrink(frame, side), budget=limits.decodes
    )
    small = decoded.frames[0][1]
    return to_jpeg(small if reveal else blur(small))
