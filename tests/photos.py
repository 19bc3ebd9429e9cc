"""Phone-sized photos for the reduced-decode tests and `bench/decode_scale.py`.

Real uploads are mostly phone photos of 12 megapixels; what this project has, without a
download, is small real photographs (`tests/data/photos`, under a megapixel). Each is
rendered at phone resolution as follows:

- a crop at the phone's aspect ratio, upscaled with Lanczos: real photographic content at
  the scales PDQ sees (its 64x64 grid samples a 4032-pixel side every 63 pixels, after
  box filters 32 pixels wide);
- what an upscale lacks and a phone's sensor and processing add: fine texture (the high
  frequencies of a real gravel texture, tiled at its own scale), sensor noise, and the
  phone's JPEG (quality 90, 4:2:0), about 3.5 to 4 MB at 4032x3024, as phone JPEGs are.
  Entropy decoding, which DCT scaling does not shorten, then costs what it costs on a
  phone's file.

What this cannot stand for: fine detail that belongs to the scene (edges sharper than the
source photo's own resolution). PDQ's filters remove such detail at any decode scale, so
its absence is unlikely to flatter the reduced decode much, but the set is a stand-in:
the figures measured on it should be checked on real phone photos where there are some.
`synthetic_scene` adds the project's own smooth synthetic textures at phone resolution.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from moderation.demo.synthetic import textured

PHOTO_DIR = Path(__file__).parent / "data" / "photos"
# The real photographs, not the texture.
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "hopper", "hubble", "rocket")
PHONE = (4032, 3024)
# Amplitudes, in 8-bit levels: the texture's high frequencies, and the sensor's noise.
_DETAIL = 0.35
_NOISE = 2.5


def source(name: str) -> Image.Image:
    with Image.open(PHOTO_DIR / f"{name}.jpg") as image:
        return image.convert("RGB")


def phone_photo(
    name: str, size: tuple[int, int] = PHONE, zoom: float = 1.0, seed: int = 0
) -> Image.Image:
    """A real photo rendered as a phone would take it at `size`: the largest crop of the
    source at that aspect ratio, narrowed by `zoom` (1.0: all of it; 0.7: the middle 70%,
    moved off centre by `seed`), upscaled, with fine texture and sensor noise added."""
    original = source(name)
    width, height = original.size
    aspect = size[0] / size[1]
    crop_width, crop_height = min(width, height * aspect), min(height, width / aspect)
    crop_width, crop_height = crop_width * zoom, crop_height * zoom
    rng = np.random.default_rng(seed)
    left = (width - crop_width) * (0.5 if zoom == 1.0 else rng.uniform(0.2, 0.8))
    top = (height - crop_height) * (0.5 if zoom == 1.0 else rng.uniform(0.2, 0.8))
    box = (left, top, left + crop_width, top + crop_height)
    scene = original.resize(size, Image.Resampling.LANCZOS, box=box)
    return _as_taken(scene, seed)


def synthetic_scene(seed: int, size: tuple[int, int] = PHONE) -> Image.Image:
    """The project's smooth synthetic texture at phone size, with the same fine texture
    and noise as `phone_photo`."""
    return _as_taken(textured(seed, size), seed)


def _as_taken(scene: Image.Image, seed: int) -> Image.Image:
    pixels = np.asarray(scene, dtype=np.float32)  # a copy, changed in place from here
    height, width = pixels.shape[:2]
    pixels += _DETAIL * _detail(width, height)[..., None]
    pixels += np.random.default_rng(seed).normal(0.0, _NOISE, pixels.shape).astype(np.float32)
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8))


@lru_cache(maxsize=2)  # landscape and portrait: 48 MB each at phone size
def _detail(width: int, height: int) -> np.ndarray:
    """The gravel texture less its 8x box-blurred self (its fine detail), tiled to size."""
    gravel = source("gravel").convert("L")
    fine = np.asarray(gravel, dtype=np.float32)
    coarse = gravel.reduce(8).resize(gravel.size, Image.Resampling.BILINEAR)
    fine = fine - np.asarray(coarse, dtype=np.float32)
    tiles = (-(-height // fine.shape[0]), -(-width // fine.shape[1]))
    detail: np.ndarray = np.tile(fine, tiles)[:height, :width]
    return detail
