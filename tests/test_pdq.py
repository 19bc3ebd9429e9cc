"""Our vectorised PDQ against the reference implementation (`pdqhash`), bit for bit."""

from __future__ import annotations

import numpy as np
import pdqhash
import pytest
from PIL import Image

from moderation.demo.synthetic import textured
from moderation.images.hashing import pdq


def _reference(image: Image.Image) -> tuple[str, int]:
    vector, quality = pdqhash.compute(np.asarray(image))
    return np.packbits(vector.astype(np.uint8)).tobytes().hex(), int(quality)


def _cases() -> list[Image.Image]:
    rng = np.random.default_rng(2026)
    sizes = [(int(rng.integers(5, 1600)), int(rng.integers(5, 1600))) for _ in range(40)]
    sizes += [(5, 5), (64, 64), (64, 300), (127, 129), (3000, 40), (640, 480)]
    images = [textured(seed, size) for seed, size in enumerate(sizes)]
    noise = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in [(100, 37), (333, 777)]]
    return images + [Image.fromarray(array) for array in noise]


def _degenerate() -> list[Image.Image]:
    """Images constant along one axis: half their DCT coefficients are zero and tie at
    the median, so which bits are set is float rounding noise, in any implementation."""
    ramp = np.tile(np.linspace(0, 255, 400, dtype=np.float32), (300, 1)).astype(np.uint8)
    stripes = ((np.arange(500)[:, None] // 7 % 2) * 255).repeat(350, 1).astype(np.uint8)
    return [Image.fromarray(ramp).convert("RGB"), Image.fromarray(stripes).convert("RGB")]


@pytest.mark.parametrize("image", _cases(), ids=lambda im: f"{im.width}x{im.height}")
def test_matches_the_reference_bit_for_bit(image: Image.Image) -> None:
    ours = pdq(image)
    assert (ours.hex, ours.quality) == _reference(image)


@pytest.mark.parametrize("image", _degenerate(), ids=["ramp", "stripes"])
def test_degenerate_images_agree_on_quality(image: Image.Image) -> None:
    assert pdq(image).quality == _reference(image)[1]


def test_images_below_the_minimum_side_hash_to_zero() -> None:
    tiny = textured(1, (4, 40))
    assert pdq(tiny).bits == bytes(32)
    assert pdq(tiny).quality == 0
    assert _reference(tiny) == ("00" * 32, 0)
