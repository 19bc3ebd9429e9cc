"""Vectors at chosen cosine distances, for testing radius boundaries exactly."""

from __future__ import annotations

import numpy as np


def at_cosine_distance(anchor: np.ndarray, distance: float, seed: int = 0) -> np.ndarray:
    """A unit vector whose cosine distance to the unit vector `anchor` is `distance`."""
    anchor = np.asarray(anchor, dtype=np.float64)
    anchor = anchor / np.linalg.norm(anchor)
    other = np.random.default_rng(seed).standard_normal(anchor.shape)
    other -= (other @ anchor) * anchor
    other /= np.linalg.norm(other)
    similarity = 1.0 - distance
    vector: np.ndarray = similarity * anchor + np.sqrt(1.0 - similarity**2) * other
    return vector.astype(np.float32)
