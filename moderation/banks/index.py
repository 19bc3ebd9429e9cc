"""A snapshot of the banks, matched exactly: what one screening call matches against.

- SHA-256: a dictionary lookup.
- PDQ: multi-index hashing (`moderation.banks.pdq_search`), distance <= the threshold.
- CLIP: a `ClipBank`. Vectors are unit length, so cosine distance is 1 - inner product.
  Candidates come from a matrix product on the worker's device, kept with a proven margin
  below the widest radius of any bank; every candidate is then checked exactly and held
  to its own bank's radius. Moderation needs full recall: nothing is approximate.

A snapshot reads row stores (`moderation.banks.rows`) that later refreshes append to; it
sees only its own rows, so it never changes once made.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from moderation.banks.clip_search import ClipBank, ClipHit
from moderation.banks.pdq_search import PdqSnapshot
from moderation.banks.rows import RowsView
from moderation.images.hashing import PDQ_BYTES, PdqHash
from moderation.images.signals import ImageSignals, SignalType


@dataclass(frozen=True)
class Match:
    bank_entry_id: int
    bank_id: int
    signal: SignalType
    distance: float
    frame_index: int
    # What the distance was held to: the bank's CLIP radius, the PDQ threshold in bits, 0
    # for SHA-256. Recorded with the hit, as evidence of the rule that fired.
    threshold: float
    # The model whose embeddings matched (CLIP only; None when the caller did not say).
    model_id: int | None = None


@dataclass(frozen=True)
class MatchSettings:
    default_radius: float
    pdq_threshold: int
    pdq_min_quality: int


class BankIndex:
    def __init__(
        self,
        settings: MatchSettings,
        sha256: RowsView,
        rows_of_hash: dict[bytes, list[int]],
        pdq: PdqSnapshot,
        clip: ClipBank,
    ) -> None:
        """`rows_of_hash`: SHA-256 -> rows of `sha256` (it may list rows this snapshot does
        not hold)."""
        self.settings = settings
        self._sha256 = sha256
        self._rows_of_hash = rows_of_hash
        self._pdq = pdq
        self.clip = clip

    @property
    def size(self) -> dict[str, int]:
        return {"sha256": len(self._sha256), "pdq": len(self._pdq), "clip": len(self.clip)}

    def match(self, signals: ImageSignals, vectors: np.ndarray) -> list[Match]:
        """Every bank entry this image matches, the closest frame per (entry, signal);
        `vectors` are the embeddings of its `embedded_frames`, in order."""
        return self.match_searched(signals, self.search_clip(vectors))

    def search_clip(self, vectors: np.ndarray) -> list[list[ClipHit]]:
        """The CLIP hits of each vector, which may come from many uploads. A search costs
        about one pass over the bank's vectors per call, not per vector, so a worker
        searches for a whole batch at once (see `moderation.banks.clip_search`)."""
        return self.clip.search(vectors)

    def match_searched(
        self,
        signals: ImageSignals,
        clip_hits: Sequence[Sequence[ClipHit]],
        *,
        model_id: int | None = None,
    ) -> list[Match]:
        """`match`, given the `search_clip` hits of the image's embedded frames, in order;
        CLIP matches name `model_id`, the model whose embeddings these are."""
        found = self._match_sha256(signals.sha256)
        found += self._match_pdq(signals)
        found += [
            Match(
                hit.bank_entry_id,
                hit.bank_id,
                SignalType.CLIP,
                hit.distance,
                frame.index,
                hit.radius,
                model_id,
            )
            for frame, frame_hits in zip(signals.embedded_frames, clip_hits, strict=True)
            for hit in frame_hits
        ]
        return _closest_per_entry(found)

    def _search_pdq(
        self, hashed: list[tuple[int, PdqHash]], threshold: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frame index, row, distance) of every live row within `threshold` bits of the
        hashes good enough to match on."""
        queried = [
            (index, pdq)
            for index, pdq in hashed
            if pdq.quality is None or pdq.quality >= self.settings.pdq_min_quality
        ]
        if not queried or not len(self._pdq):
            return (np.empty(0, np.int64),) * 3
        queries = np.frombuffer(b"".join(pdq.bits for _, pdq in queried), np.uint8).reshape(
            -1, PDQ_BYTES
        )
        query_rows, rows, distances = self._pdq.search(queries, threshold)
        frames = np.array([index for index, _ in queried], np.int64)[query_rows]
        return frames, rows, distances

    def _match_sha256(self, sha256: bytes) -> list[Match]:
        # A copy: a refresh may append to the list meanwhile.
        rows = np.array(list(self._rows_of_hash.get(sha256, ())), np.int64)
        rows = rows[self._sha256.live(rows)]
        return [
            Match(entry_id, bank_id, SignalType.SHA256, 0.0, 0, 0.0)
            for entry_id, bank_id in zip(
                self._sha256.entry_ids[rows].tolist(),
                self._sha256.bank_ids[rows].tolist(),
                strict=True,
            )
        ]

    def pdq_near_miss(self, signals: ImageSignals, margin: int) -> bool:
        """Whether frame 0, decoded at reduced scale, has a PDQ more than the threshold but
        at most `margin` bits more from some entry: one that its full-resolution PDQ might
        match (see `moderation.images.signals.full_resolution_pdq`)."""
        if signals.decode_scale == 1 or margin <= 0 or signals.pdq_full_resolution:
            return False
        frame0 = [(f.index, f.pdq) for f in signals.frames if f.index == 0]
        if signals.pdq_as_stored is not None:
            frame0.append((0, signals.pdq_as_stored))
        _, _, distances = self._search_pdq(frame0, self.settings.pdq_threshold + margin)
        return bool((distances > self.settings.pdq_threshold).any())

    def _match_pdq(self, signals: ImageSignals) -> Iterable[Match]:
        hashed = [(frame.index, frame.pdq) for frame in signals.frames]
        if signals.pdq_as_stored is not None:
            hashed.append((0, signals.pdq_as_stored))
        hashed += [(0, full) for full in signals.pdq_full_resolution]
        frames, rows, distances = self._search_pdq(hashed, self.settings.pdq_threshold)
        threshold = float(self.settings.pdq_threshold)
        return [
            Match(entry_id, bank_id, SignalType.PDQ, distance, frame, threshold)
            for entry_id, bank_id, distance, frame in zip(
                self._pdq.rows.entry_ids[rows].tolist(),
                self._pdq.rows.bank_ids[rows].tolist(),
                distances.astype(np.float64).tolist(),
                frames.tolist(),
                strict=True,
            )
        ]


def _closest_per_entry(matches: list[Match]) -> list[Match]:
    best: dict[tuple[int, SignalType], Match] = {}
    for match in matches:
        key = (match.bank_entry_id, match.signal)
        if key not in best or match.distance < best[key].distance:
            best[key] = match
    return list(best.values())


def merge_model_matches(per_model: Sequence[Sequence[Match]]) -> list[Match]:
    """One image's matches under several models (the active model's first, each from
    `match_searched` with the same signals): every hash match once, and for each entry
    its CLIP match under the first model that found one. Distances of two models are
    never compared: each was held to its own radius already."""
    if len(per_model) == 1:
        return list(per_model[0])
    merged: dict[tuple[int, SignalType], Match] = {}
    for matches in per_model:
        for match in matches:
            merged.setdefault((match.bank_entry_id, match.signal), match)
    return list(merged.values())
