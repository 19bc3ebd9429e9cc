"""PDQ, Meta's 256-bit perceptual hash, vectorised.

The reference (ThreatExchange's C++, wrapped by `pdqhash`) computes float luma, blurs it
with two passes of box filters along rows and then columns (the Jarosz filter), samples a
64x64 grid, takes the top-left 16x16 of its DCT and sets the bits above the median. The
`pdqhash` binding first converts the image to luma in float64 NumPy, which alone costs as
much as the hashing; on a 2-core worker PDQ was the largest cost after the model.

Box filters and sampling are linear and separable, so blur-then-sample is one matrix on
each side: `grid = P(rows).T @ luma @ P(cols)`, with P(n) an (n, 64) matrix that depends
only on the side length and is cached. Luma is linear too, so it is folded into the
right-hand matrix: the RGB rows are multiplied as they are, (h, 3w) by (3w, 64), and no
luma image is ever written. That matrix is a band (each sample blurs a few neighbouring
columns), so it is cut into groups of outputs, each multiplied only by the columns under
its windows: an eighth of the work. That runs as matrix products in torch (which releases
the GIL), reading each pixel once, in row blocks that stay in cache. The DCT, median and
quality metric follow the reference step by step. `tests/test_pdq.py` holds this to
`pdqhash` bit for bit.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

GRID = 64
MIN_HASHABLE_SIDE = 5
_PASSES = 2
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)
# Rows converted to float at a time: the copy stays in cache and a large image is never
# copied whole.
_ROW_BLOCK = 64
# Groups the 64 sampled columns are computed in (see `_luma_sampling_bands`). Measured: 8
# takes 34 ms on a 12 MP frame against 48 for the whole matrix at once; 4 and 16 no better.
_OUTPUT_GROUPS = 8


def pdq_bits_and_quality(frame: Image.Image) -> tuple[bytes, int]:
    """The 32-byte hash (ThreatExchange bit order, most significant first) and quality."""
    width, height = frame.size
    if width < MIN_HASHABLE_SIDE or height < MIN_HASHABLE_SIDE:
        return bytes(32), 0
    bands = _luma_sampling_bands(width)
    blocks = []
    for start in range(0, height, _ROW_BLOCK):
        rows = torch.from_numpy(_rgb_rows(frame, start, min(height, start + _ROW_BLOCK)))
        blocks.append(torch.cat([rows[:, first:end] @ band for first, end, band in bands], 1))
    sampled_rows = torch.cat(blocks)
    grid = (_sampling_matrix(height).T @ sampled_rows).numpy()
    dct = _dct_16x16(grid)
    median = np.partition(dct.ravel(), 127)[127]  # Torben's: the 128th smallest of 256
    # Bit k is coefficient k (row-major); the hex form writes bit 255 first.
    bits = np.packbits((dct.ravel() > median)[::-1]).tobytes()
    return bits, _quality(grid)


def _rgb_rows(frame: Image.Image, top: int, bottom: int) -> np.ndarray:
    """Rows [top, bottom) as float32, (rows, 3 * width). Cropped from the image block by
    block: converting the whole frame to an array would copy it twice over."""
    block = np.asarray(frame.crop((0, top, frame.width, bottom)), dtype=np.float32)
    return block.reshape(bottom - top, -1)


@lru_cache(maxsize=64)
def _sampling_matrix(length: int) -> torch.Tensor:
    """P with `vector @ P` = the Jarosz-blurred vector sampled at PDQ's 64 positions."""
    window = (length + 2 * GRID - 1) // (2 * GRID)
    half = (window + 2) // 2
    before, after = window - half, half - 1

    def box(i: int) -> tuple[int, int]:
        """Inclusive-exclusive bounds of the box averaged into output i, clipped at edges."""
        return max(0, i - before), min(length, i + after + 1)

    # Blur passes compose: P[:, c] = (e_s A^n)^T for the sampled position s, A the box average.
    matrix = np.zeros((length, GRID), dtype=np.float64)
    for column in range(GRID):
        sample = int(((column + 0.5) * length) / GRID)
        weights = np.zeros(length)
        weights[sample] = 1.0
        for _ in range(_PASSES):
            spread = np.zeros(length)
            for i in np.flatnonzero(weights):
                low, high = box(int(i))
                spread[low:high] += weights[i] / (high - low)
            weights = spread
        matrix[:, column] = weights
    return torch.from_numpy(matrix.astype(np.float32))


@lru_cache(maxsize=64)
def _luma_sampling_bands(width: int) -> tuple[tuple[int, int, torch.Tensor], ...]:
    """L, (3 * width, 64) with `rgb_row @ L` = the luma row blurred and sampled (as
    `luma_row @ P`), in groups of outputs: (first row, end row, L's non-zero rows there)."""
    across = _sampling_matrix(width)
    matrix = (across[:, None, :] * _LUMA[None, :, None]).reshape(3 * width, GRID)
    per_group = GRID // _OUTPUT_GROUPS
    bands = []
    for group in range(_OUTPUT_GROUPS):
        columns = matrix[:, group * per_group : (group + 1) * per_group]
        used = torch.nonzero(columns.abs().sum(dim=1)).flatten()
        first, end = int(used[0]), int(used[-1]) + 1
        bands.append((first, end, columns[first:end].contiguous()))
    return tuple(bands)


def _dct_matrix() -> np.ndarray:
    scale = np.float32(math.sqrt(2.0 / GRID))
    rows, cols = np.meshgrid(np.arange(16), np.arange(GRID), indexing="ij")
    matrix: np.ndarray = (
        scale * np.cos((math.pi / 2.0 / GRID) * (rows + 1) * (2 * cols + 1))
    ).astype(np.float32)
    return matrix


_DCT = _dct_matrix()


def _dct_16x16(grid: np.ndarray) -> np.ndarray:
    result: np.ndarray = (_DCT @ grid) @ _DCT.T
    return result


def _quality(grid: np.ndarray) -> int:
    """The reference's heuristic: a count of significant gradients, scaled to 0-100."""
    down = np.trunc(((grid[:-1, :] - grid[1:, :]) * np.float32(100)) / np.float32(255))
    across = np.trunc(((grid[:, :-1] - grid[:, 1:]) * np.float32(100)) / np.float32(255))
    gradient_sum = int(np.abs(down).sum() + np.abs(across).sum())
    return min(100, gradient_sum // 90)
