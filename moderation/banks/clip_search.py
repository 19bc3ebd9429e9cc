"""Exact CLIP range search over a bank of up to millions of unit vectors.

A search runs in two steps:

1. Candidates: every bank row whose product with the query, computed by one of the
   methods of `clip_methods` (Faiss's scan, a NumPy or torch product in float32, or a
   torch product over a float16 or bfloat16 copy of the bank, on the CPU or a GPU), is
   at least the threshold minus `candidate_margin`, a proven bound on how far that
   product can be from the exact inner product.
2. Exact check: the inner product of each candidate, in float64 from the float32
   vectors on the host, held to its own bank's radius.

So the hits depend neither on the method nor on the device, the BLAS or the block sizes:
a CPU worker and a GPU worker find the same entries at the same distances. Which method
runs is the bank's `ClipPlan` (`clip_plan`): measured per machine, by batch and size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from moderation.banks import clip_methods
from moderation.banks.clip_methods import Method
from moderation.banks.clip_plan import ClipPlan, default_plan
from moderation.banks.rows import RowsView, SignalRows

logger = logging.getLogger(__name__)

# Float32 resolves cosine distances to about 1e-7: a vector placed exactly on the radius
# may compute a hair outside it. The radius is held to within this tolerance.
FLOAT_SLACK = 1e-6

# Candidates checked exactly per step: bounds the float64 copies of their vectors (48 MB).
_EXACT_CHUNK = 8192
# Rows per step when the bank is measured or copied to the device: 8,192 768-d rows are
# 50 MB as float64, small beside the bank (a million rows as one float64 array are 6 GB).
_ROWS_PER_STEP = 8192


@dataclass(frozen=True)
class ClipHit:
    bank_entry_id: int
    bank_id: int
    distance: float
    # The radius of the entry's bank that the distance was held to.
    radius: float


@dataclass(frozen=True)
class Rounding:
    """How a matrix product in some precision can differ from the exact inner product."""

    unit_in: float  # relative error of rounding a float32 input to the product's inputs
    tiny_in: float  # absolute error of that rounding below the smallest normal number
    unit_out: float  # relative error of rounding the float32 accumulator to the output
    tiny_out: float


_FP16 = 2.0**-11  # unit roundoff: 11 significant bits
_BF16 = 2.0**-8  # 8 significant bits
_FP32 = 2.0**-24
_FP64 = 2.0**-53
ROUNDING = {
    torch.float32: Rounding(0.0, 0.0, 0.0, 0.0),
    # Half the subnormal spacing: float16's is 2^-24, bfloat16's 2^-133.
    torch.float16: Rounding(_FP16, 2.0**-25, _FP16, 2.0**-25),
    torch.bfloat16: Rounding(_BF16, 2.0**-134, _BF16, 2.0**-134),
}


def _gamma(n: int, unit: float) -> float:
    """Higham's gamma_n: the relative bound of n rounding errors in a row."""
    return n * unit / (1 - n * unit)


def candidate_margin(dim: int, rounding: Rounding, query_norm: float, bank_norm: float) -> float:
    """How far below the exact inner product of x (norm <= query_norm) and y (norm <=
    bank_norm) a product of them may come out, computed with inputs rounded to a narrower
    type (`rounding`), products summed in float32 in any order, and the sum rounded to
    the output type; plus the float64 check's own error and the rounding of the
    threshold to float32 when scores are compared with it.

    Derivation (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), with u and
    eta the input rounding's relative and subnormal errors, |x^_i - x_i| <= u|x_i| + eta:
      |x^_i y^_i - x_i y_i| <= (u|x_i| + eta)|y^_i| + |x_i|(u|y_i| + eta), so over i
      |x^.y^ - x.y| <= (2u + u^2)|x||y| + eta(1+u)(|x|_1 + |y|_1) + d eta^2,
      with |x|_1 <= sqrt(d)|x| (Cauchy-Schwarz, as for |x.y| <= |x||y| above).
    A product of two float16 (or bfloat16) numbers is exact in float32, so the float32
    sum adds at most gamma_d(2^-24) sum|x^_i y^_i| <= gamma_d |x^||y^| = gamma_d B, with
    B = ((1+u)|x| + eta sqrt(d)) ((1+u)|y| + eta sqrt(d)); for float32 inputs gamma_d
    covers the d products' roundings too. Rounding the sum to a float16 output adds
    u_out (1 + gamma_d) B + eta_out. For unit vectors at 768-d: float16 1.5e-3 (so the
    candidates of radius 0.05 are the rows within 0.0515), bfloat16 1.2e-2, float32 4.6e-5.

    This holds only if the sum really is float32: cuBLAS may otherwise reduce float16
    partial sums in float16, which `ClipRows` forbids on CUDA (see `_exact_sums_on_cuda`);
    `clip_plan.honours_margin` checks each method on this machine before it is used.
    """
    u, eta = rounding.unit_in, rounding.tiny_in
    root_d = math.sqrt(dim)
    norms = query_norm * bank_norm
    inputs = (2 * u + u * u) * norms + eta * (1 + u) * root_d * (query_norm + bank_norm)
    inputs += dim * eta * eta
    rounded = ((1 + u) * query_norm + eta * root_d) * ((1 + u) * bank_norm + eta * root_d)
    summed = _gamma(dim, _FP32) * rounded
    output = rounding.unit_out * (1 + _gamma(dim, _FP32)) * rounded + rounding.tiny_out
    exact_check = _gamma(dim, _FP64) * norms
    threshold_as_float32 = _FP32
    return inputs + summed + output + exact_check + threshold_as_float32


def rounding_of(dtype: torch.dtype) -> Rounding:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        # "high" and "medium" let float32 products run with TF32 or bfloat16 inputs; take
        # the coarser, so the margin holds whatever the process chose for its model.
        return ROUNDING[torch.bfloat16]
    return ROUNDING[dtype]


def _exact_sums_on_cuda(dtype: torch.dtype) -> None:
    """Make cuBLAS sum float16/bfloat16 products in float32, which `candidate_margin`
    assumes. Process-wide; it narrows cuBLAS's choice of split-K kernels for the model's
    float16 products too, which then also reduce in float32 (torch's own default for them
    is to allow float16 reductions, a speed-for-precision trade the model can make and a
    range search cannot)."""
    matmul = torch.backends.cuda.matmul
    if dtype == torch.float16 and (
        matmul.allow_fp16_reduced_precision_reduction or matmul.allow_fp16_accumulation
    ):
        logger.info("float16 products now reduce in float32, as exact bank matching needs")
        matmul.allow_fp16_reduced_precision_reduction = False
        matmul.allow_fp16_accumulation = False
    if dtype == torch.bfloat16 and matmul.allow_bf16_reduced_precision_reduction:
        logger.info("bfloat16 products now reduce in float32, as exact bank matching needs")
        matmul.allow_bf16_reduced_precision_reduction = False


class ClipRows(SignalRows):
    """The CLIP vectors of bank entries, appended (see `moderation.banks.rows`): float32
    rows on the host, which the exact check reads and float32 methods multiply, and a copy
    of them for each other (device, dtype) that the plan's methods read, converted a block
    at a time (never a second full float32 copy). Snapshots are `bank`s."""

    def __init__(
        self,
        dim: int,
        *,
        device: str | torch.device = "cpu",
        plan: ClipPlan | None = None,
        capacity: int = 0,
    ) -> None:
        """`plan`: how banks made of these rows are searched (default: `default_plan`)."""
        super().__init__(np.float32, (dim,), capacity)
        self.device = torch.device(device)
        self.plan = plan or default_plan(str(self.device))
        for copy_device, dtype in self.plan.copies:
            if torch.device(copy_device).type == "cuda":
                _exact_sums_on_cuda(dtype)
        self.max_norm = 0.0  # of every row ever appended: an upper bound for any snapshot
        self.copies = self._copies(0)

    @classmethod
    def holding(
        cls,
        entry_ids: np.ndarray,
        bank_ids: np.ndarray,
        vectors: np.ndarray,
        *,
        device: str | torch.device = "cpu",
        plan: ClipPlan | None = None,
    ) -> ClipRows:
        """Rows that are these arrays themselves, not copies (a benchmark's bank of a
        million, a retro-hunt's entries); the caller must not change them afterwards."""
        if vectors.dtype != np.float32 or not vectors.flags.c_contiguous or vectors.ndim != 2:
            raise ValueError("bank vectors must be a C-contiguous float32 matrix")
        if not len(entry_ids) == len(bank_ids) == len(vectors):
            raise ValueError("one entry id and bank id per bank vector")
        rows = cls(vectors.shape[1], device=device, plan=plan)
        rows.entry_ids = np.asarray(entry_ids, np.int64)
        rows.bank_ids = np.asarray(bank_ids, np.int64)
        rows.payload = vectors
        rows.copies = rows._copies(0)
        rows._written(0, len(vectors))
        rows.count = len(vectors)
        return rows

    def copy_for(self, method: Method) -> torch.Tensor:
        """What `method` multiplies: every row appended so far (and room beyond)."""
        if method.reads_host_rows:
            return torch.from_numpy(self.payload)
        return self.copies[method.copy]

    def bank(self, radii: Mapping[int, float], *, block_scores: int | None = None) -> ClipBank:
        """A snapshot of the rows appended so far, less the retired ones, each held to its
        bank's radius in `radii` (rows of banks not in it never match)."""
        n = self.count
        return ClipBank(
            self.view(),
            {copy: scored[:n] for copy, scored in self.copies.items()},
            self.max_norm,
            radii,
            plan=self.plan,
            block_scores=block_scores,
        )

    def _copies(self, rows_kept: int) -> dict[tuple[str, torch.dtype], torch.Tensor]:
        """The copies for the current host arrays, keeping the first `rows_kept` rows of
        the old ones."""
        copies = {}
        for copy in sorted(self.plan.copies, key=str):
            copy_device, dtype = copy
            scored = torch.empty(self.payload.shape, dtype=dtype, device=copy_device)
            if rows_kept:
                scored[:rows_kept] = self.copies[copy][:rows_kept]
            copies[copy] = scored
        return copies

    def _written(self, start: int, end: int) -> None:
        self.max_norm = max(self.max_norm, _max_norm(self.payload[start:end]))
        host = torch.from_numpy(self.payload)
        for (copy_device, dtype), scored in self.copies.items():
            for step in range(start, end, _ROWS_PER_STEP):
                stop = min(end, step + _ROWS_PER_STEP)
                scored[step:stop] = host[step:stop].to(copy_device, dtype)

    def _grow(self, capacity: int) -> None:
        super()._grow(capacity)
        self.copies = self._copies(self.count)

    def _empty(self, capacity: int) -> ClipRows:
        return ClipRows(
            self.payload.shape[1], device=self.device, plan=self.plan, capacity=capacity
        )


class ClipBank:
    """A snapshot of CLIP bank rows (`ClipRows.bank`), searched exactly.

    `vectors` (float32 on the host, one row per entry) are held for the exact check and
    the float32 methods; `copies` hold the same rows for the plan's other methods. A row
    counts only if the snapshot holds it (not retired) and its bank has a radius in `radii`.
    """

    def __init__(
        self,
        rows: RowsView,
        copies: Mapping[tuple[str, torch.dtype], torch.Tensor],
        bank_norm: float,
        radii: Mapping[int, float],
        *,
        plan: ClipPlan,
        block_scores: int | None = None,
    ) -> None:
        """`bank_norm`: at least the largest norm of the rows; `block_scores`: scores per
        product (default: `clip_methods.BLOCK_SCORES` of the device)."""
        self.entry_ids = rows.entry_ids
        self.bank_ids = rows.bank_ids
        self.vectors = rows.payload
        self.plan = plan
        self._rows = rows
        self._copies = dict(copies)
        self._bank_norm = bank_norm
        self._radius_banks = np.array(sorted(radii), np.int64)
        self._radius_values = np.array([radii[b] for b in self._radius_banks], np.float64)
        self.widest_radius = float(self._radius_values.max()) if len(radii) else 0.0
        self._block_scores = block_scores

    def __len__(self) -> int:
        """The rows that count (retired ones aside)."""
        return len(self._rows)

    def method_for(self, batch: int) -> Method:
        return self.plan.method_for(len(self.vectors), batch)

    def search(self, queries: np.ndarray, method: Method | None = None) -> list[list[ClipHit]]:
        """The hits of each query (unit float32 rows): every entry within its bank's
        radius. `method`: the candidates' (default: the plan's for this batch)."""
        queries = np.ascontiguousarray(queries, np.float32)
        if not len(queries) or not len(self) or not len(self._radius_banks):
            return [[] for _ in queries]
        method = method or self.method_for(len(queries))
        query_norm = float(np.linalg.norm(queries.astype(np.float64), axis=1).max())
        margin = candidate_margin(
            queries.shape[1], rounding_of(method.dtype), query_norm, self._bank_norm
        )
        floor = 1.0 - self.widest_radius - FLOAT_SLACK - margin
        scored = (
            torch.from_numpy(self.vectors) if method.reads_host_rows else self._copies[method.copy]
        )
        query_rows, bank_rows = clip_methods.candidates(
            method, queries, self.vectors, scored, floor, self._block_scores
        )
        held = self._rows.live(bank_rows)
        return self._exact(queries, query_rows[held], bank_rows[held])

    def _radius_of(self, bank_ids: np.ndarray) -> np.ndarray:
        """Each row's bank's radius; -inf (never within) for a bank without one."""
        at = np.minimum(np.searchsorted(self._radius_banks, bank_ids), len(self._radius_banks) - 1)
        has_radius = self._radius_banks[at] == bank_ids
        return np.where(has_radius, self._radius_values[at], -np.inf)

    def _exact(
        self, queries: np.ndarray, query_rows: np.ndarray, bank_rows: np.ndarray
    ) -> list[list[ClipHit]]:
        hits: list[list[ClipHit]] = [[] for _ in queries]
        for start in range(0, len(bank_rows), _EXACT_CHUNK):
            rows = bank_rows[start : start + _EXACT_CHUNK]
            asked = query_rows[start : start + _EXACT_CHUNK]
            similarity = np.einsum(
                "ij,ij->i",
                queries[asked].astype(np.float64),
                self.vectors[rows].astype(np.float64),
            )
            distance = 1.0 - similarity
            radius = self._radius_of(self.bank_ids[rows])
            within = distance <= radius + FLOAT_SLACK
            for query, row, found, held_to in zip(
                asked[within], rows[within], distance[within], radius[within], strict=True
            ):
                # Python numbers: psycopg2 would write a NumPy float as "np.float64(...)".
                hits[query].append(
                    ClipHit(
                        int(self.entry_ids[row]),
                        int(self.bank_ids[row]),
                        max(0.0, float(found)),
                        float(held_to),
                    )
                )
        return hits


def _max_norm(vectors: np.ndarray) -> float:
    """The largest row norm, a block at a time (no float64 copy of the whole bank)."""
    largest = 0.0
    for start in range(0, len(vectors), _ROWS_PER_STEP):
        block = vectors[start : start + _ROWS_PER_STEP].astype(np.float64)
        largest = max(largest, float(np.sqrt(np.einsum("ij,ij->i", block, block).max())))
    return largest
