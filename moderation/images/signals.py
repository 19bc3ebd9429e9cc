"""Everything computed from an image's bytes before the model runs: one pass, shared by
screening and by adding images to a bank, so both sides of a match are made the same way."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from moderation.images.budget import Budget
from moderation.images.decode import DecodeLimits, decode
from moderation.images.hashing import PdqHash, pdq, sha256
from moderation.images.thumbnails import frame_thumbnail


class SignalType(enum.StrEnum):
    SHA256 = "sha256"
    PDQ = "pdq"
    CLIP = "clip"


@dataclass(frozen=True)
class FrameSignals:
    index: int  # frame index in the file
    pdq: PdqHash
    # Resized and cropped for the (first) embedding model, uint8 (H, W, 3); sampled frames
    # only.
    pixels: np.ndarray | None
    # While several models are computed (a model change, see `moderation.embedding`): the
    # crops for the others, in the order their preprocessings were given.
    more_pixels: tuple[np.ndarray, ...] = ()

    @property
    def crops(self) -> tuple[np.ndarray, ...]:
        """One crop per preprocessing given; empty for a frame that was not sampled."""
        return () if self.pixels is None else (self.pixels, *self.more_pixels)

    # A small JPEG of the frame as screened, kept as review evidence if the upload hits
    # (`moderation.evidence`); None when screening keeps no evidence.
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class ImageSignals:
    sha256: bytes
    format: str
    width: int
    height: int
    # Frames read; a lower bound when `frame_count_exact` is False (reading stopped at
    # `max_animation_frames` or `max_animation_pixels` before the end of the file).
    frame_count: int
    # The hashed frames, in order: at most `max_hashed_frames` of those read, spread evenly,
    # first and last included. `len(frames)` is the number hashed.
    frames: list[FrameSignals]
    # PDQ of frame 0 as the file stores it, when EXIF orientation turned it upright. Hash
    # lists made without applying orientation (ThreatExchange's Python hasher, and so
    # HMA) hold this one for a photo stored sideways; matching tries both.
    pdq_as_stored: PdqHash | None = None
    frame_count_exact: bool = True
    # Frame 0 was decoded at 1/decode_scale of its size (a large JPEG, see `decode`), so
    # its PDQ differs from the full-resolution reference by a few bits.
    decode_scale: int = 1
    # PDQ of frame 0 at full resolution (and as stored, when orientation turned it), as
    # hash lists hold it: computed only for an upload decoded at reduced scale whose PDQ
    # came near a bank entry (see `full_resolution_pdq`), and matched beside the others.
    pdq_full_resolution: tuple[PdqHash, ...] = ()

    @property
    def embedded_frames(self) -> list[FrameSignals]:
        """The sampled frames, which carry pixels for the model; the first is always one."""
        return [frame for frame in self.frames if frame.pixels is not None]

    def embedding_inputs(self, model: int = 0) -> list[np.ndarray]:
        """The sampled frames' crops for the `model`-th preprocessing given."""
        return [frame.crops[model] for frame in self.frames if frame.pixels is not None]


Preprocess = Callable[[Image.Image], np.ndarray]


def extract_signals(
    data: bytes,
    limits: DecodeLimits,
    preprocess: Preprocess | Sequence[Preprocess],
    budget: Budget | None = None,
    *,
    thumbnail_side: int | None = None,
) -> ImageSignals:
    """Decode safely; hash the visited frames (at most `max_hashed_frames`) and preprocess
    the sampled ones (at most `max_frames`, always frame 0), once per preprocessing given
    (one per embedding model computed: one decode serves them all). Raises `BadInput`.

    A large JPEG is decoded at reduced scale (`limits.decode_min_side`), never smaller
    than any embedding model's input (its `decode_side`, where it has one).

    `thumbnail_side`: also render each hashed frame as a JPEG of at most this side, the
    review copy kept should the upload hit (its frame is only known after matching)."""
    preprocessings = [preprocess] if callable(preprocess) else list(preprocess)
    side = max((getattr(p, "decode_side", 0) for p in preprocessings), default=0)

    def visit(
        frame: Image.Image, sampled: bool
    ) -> tuple[PdqHash, tuple[np.ndarray, ...], bytes | None]:
        kept = frame_thumbnail(frame, thumbnail_side) if thumbnail_side else None
        crops = tuple(p(frame) for p in preprocessings) if sampled else ()
        return pdq(frame), crops, kept

    decoded = decode(
        data,
        limits.decoding_at_least(side),
        visit,
        budget=budget,
        visit_as_stored=pdq,
    )
    return ImageSignals(
        sha256=sha256(data),
        format=decoded.format,
        width=decoded.width,
        height=decoded.height,
        frame_count=decoded.frame_count,
        frame_count_exact=decoded.frame_count_exact,
        frames=[
            FrameSignals(
                index=index,
                pdq=hashed,
                pixels=crops[0] if crops else None,
                more_pixels=crops[1:],
                thumbnail=kept,
            )
            for index, (hashed, crops, kept) in decoded.frames
        ],
        pdq_as_stored=decoded.as_stored,
        decode_scale=decoded.scale,
    )


def full_resolution_pdq(
    data: bytes, limits: DecodeLimits, budget: Budget | None = None
) -> tuple[PdqHash, ...]:
    """PDQ of frame 0 at full resolution as the reference hashes it, and as stored where
    EXIF orientation turns it: what a hash list made elsewhere holds for this image."""
    decoded = decode(
        data,
        replace(limits, decode_min_side=None, max_hashed_frames=1),
        lambda frame, sampled: pdq(frame),
        budget=budget,
        visit_as_stored=pdq,
    )
    upright: PdqHash = decoded.frames[0][1]
    return (upright,) if decoded.as_stored is None else (upright, decoded.as_stored)
