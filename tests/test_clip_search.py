"""Exact CLIP range search: candidates from a product in any precision, then the exact check.

The CUDA path is the float16 path here run on the CPU: the same code, the same margin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moderation.banks import clip_methods, clip_search
from moderation.banks.clip_methods import Method
from moderation.banks.clip_plan import ClipPlan
from moderation.banks.clip_search import FLOAT_SLACK, ClipBank, ClipHit, ClipRows
from tests.vectors import at_cosine_distance

DIM = 768  # the production model's: the margin grows with the dimension
RADIUS = 0.05
QUERIES = 8
# Around each query, distractors every 5e-5 of cosine distance from 0.0485 to 0.0515,
# within float16's error of the radius on both sides (its margin is 1.5e-3 at 768-d), and
# every 5e-6 in the last 1e-4 inside it, where a product rounded down would miss a hit.
NEAR_RADIUS = np.concatenate([np.linspace(0.0485, 0.0515, 61), np.linspace(0.0499, 0.05, 21)])


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray]:
    """Queries, and a bank that holds for each: one entry on the radius (0.05, a hit),
    one just outside (0.0501), the distractors, then random unit vectors."""
    rng = np.random.default_rng(11)
    queries = rng.standard_normal((QUERIES, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rows = []
    for i, query in enumerate(queries):
        rows.append(at_cosine_distance(query, 0.05, seed=1000 * i))
        rows.append(at_cosine_distance(query, 0.0501, seed=1000 * i + 1))
        rows += [
            at_cosine_distance(query, distance, seed=1000 * i + 2 + k)
            for k, distance in enumerate(NEAR_RADIUS)
        ]
    noise = rng.standard_normal((2000, DIM)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    bank = np.concatenate([np.stack(rows), noise])
    return queries, bank[rng.permutation(len(bank))]


def _clip_bank(
    bank: np.ndarray,
    radius: float = RADIUS,
    *,
    method: Method = clip_methods.TORCH_FLOAT32,
    block_scores: int | None = None,
) -> ClipBank:
    n = len(bank)
    # Entry ids distinct from row numbers, so a hit that names the row would be caught.
    rows = ClipRows.holding(
        np.arange(n, dtype=np.int64) + 10_000,
        np.full(n, 7, np.int64),
        np.ascontiguousarray(bank),
        plan=ClipPlan.only(method),
    )
    return rows.bank({7: radius}, block_scores=block_scores)


def _reference(queries: np.ndarray, bank: np.ndarray, radius: float = RADIUS) -> list[set[int]]:
    """Entry ids within the radius, by float64 arithmetic over the whole bank."""
    distances = 1.0 - queries.astype(np.float64) @ bank.astype(np.float64).T
    return [
        set((np.nonzero(row <= radius + FLOAT_SLACK)[0] + 10_000).tolist()) for row in distances
    ]


# Every CPU method, whether or not this CPU has the instructions that make it fast: the
# CUDA ones are the float16 and float32 torch products here run on the CPU.
CPU_METHODS = [method for method in clip_methods.METHODS.values() if method.device == "cpu"]
HALF_METHODS = [clip_methods.TORCH_FLOAT16, clip_methods.TORCH_BFLOAT16]


@pytest.mark.parametrize("method", CPU_METHODS, ids=lambda method: method.name)
@pytest.mark.parametrize("block_scores", [None, 1000])
# 0.0501: float16's grid puts a rounding midpoint just above 1 - 0.0501, so products of
# entries on that radius round down below it; the margin must still find them.
@pytest.mark.parametrize("radius", [RADIUS, 0.0501])
def test_every_precision_finds_exactly_the_entries_within_the_radius(
    case: tuple[np.ndarray, np.ndarray], method: Method, block_scores: int | None, radius: float
) -> None:
    queries, bank = case
    hits = _clip_bank(bank, radius, method=method, block_scores=block_scores).search(queries)
    assert [{hit.bank_entry_id for hit in found} for found in hits] == _reference(
        queries, bank, radius
    )
    # For every query, exactly the entries planted within the radius (0.05 in and 0.0501
    # out, or both in), at their distances.
    planted = [0.05, 0.0501, *NEAR_RADIUS.tolist()]
    for query, found in zip(queries, hits, strict=True):
        assert sorted(hit.distance for hit in found) == pytest.approx(
            sorted(d for d in planted if d <= radius + 1e-9), abs=1e-6
        )
        assert all(hit.bank_id == 7 for hit in found)
        # Python numbers, which the database driver writes as numbers.
        assert {(type(h.bank_entry_id), type(h.bank_id), type(h.distance)) for h in found} == {
            (int, int, float)
        }
        for hit in found:
            exact = 1.0 - float(query.astype(np.float64) @ bank[hit.bank_entry_id - 10_000])
            assert hit.distance == pytest.approx(exact, abs=1e-12)


def test_every_method_reports_the_same_hits(case: tuple[np.ndarray, np.ndarray]) -> None:
    queries, bank = case
    results = [_clip_bank(bank, method=method).search(queries) for method in CPU_METHODS]
    assert all(found == results[0] for found in results)
    # Whatever the batch: one query at a time too.
    assert [_clip_bank(bank).search(queries[i : i + 1])[0] for i in range(QUERIES)] == results[0]


@pytest.mark.parametrize("method", HALF_METHODS, ids=lambda method: method.name)
def test_without_its_margin_a_narrow_product_would_miss_entries_on_the_radius(
    case: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch, method: Method
) -> None:
    """The distractors are hard enough that the margin is what makes the search exact."""
    queries, bank = case
    monkeypatch.setattr(clip_search, "candidate_margin", lambda *args: 0.0)
    found = [
        {hit.bank_entry_id for hit in hits}
        for hits in _clip_bank(bank, 0.0501, method=method).search(queries)
    ]
    expected = _reference(queries, bank, 0.0501)
    assert all(f <= e for f, e in zip(found, expected, strict=True))  # still no false hit
    assert sum(len(e - f) for f, e in zip(found, expected, strict=True)) > 0


def test_the_float16_margin_covers_the_worst_error_seen(
    case: tuple[np.ndarray, np.ndarray],
) -> None:
    queries, bank = case
    margin = clip_search.candidate_margin(
        DIM, clip_search.ROUNDING[torch.float16], 1.0 + 1e-6, 1.0 + 1e-6
    )
    exact = queries.astype(np.float64) @ bank.astype(np.float64).T
    half = (torch.from_numpy(queries).half() @ torch.from_numpy(bank).half().T).double().numpy()
    worst = float(np.abs(half - exact).max())
    assert worst <= margin
    assert 1.4e-3 < margin < 1.6e-3  # the figure the module's docstring states


def test_an_empty_bank_and_an_empty_batch() -> None:
    empty = _clip_bank(np.zeros((0, DIM), np.float32))
    assert empty.search(np.ones((2, DIM), np.float32) / np.sqrt(DIM)) == [[], []]
    one = _clip_bank(np.eye(DIM, dtype=np.float32)[:1])
    assert one.search(np.zeros((0, DIM), np.float32)) == []
    assert one.search(np.eye(DIM, dtype=np.float32)[:1]) == [[ClipHit(10_000, 7, 0.0, RADIUS)]]


def test_a_cuda_bank_makes_cublas_sum_float16_products_in_float32() -> None:
    """The margin assumes float32 sums; torch lets cuBLAS reduce float16 partial sums in
    float16 unless told otherwise (the flags are process-wide and exist without a GPU)."""
    matmul = torch.backends.cuda.matmul
    before = (
        matmul.allow_fp16_reduced_precision_reduction,
        matmul.allow_bf16_reduced_precision_reduction,
    )
    try:
        matmul.allow_fp16_reduced_precision_reduction = True
        matmul.allow_bf16_reduced_precision_reduction = True
        clip_search._exact_sums_on_cuda(torch.float16)
        assert not matmul.allow_fp16_reduced_precision_reduction
        assert not matmul.allow_fp16_accumulation
        clip_search._exact_sums_on_cuda(torch.bfloat16)
        assert not matmul.allow_bf16_reduced_precision_reduction
    finally:
        matmul.allow_fp16_reduced_precision_reduction = before[0]
        matmul.allow_bf16_reduced_precision_reduction = before[1]


def test_lowered_float32_precision_widens_the_margin_to_bfloat16s() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert clip_search.rounding_of(torch.float32) == clip_search.ROUNDING[torch.bfloat16]
    finally:
        torch.set_float32_matmul_precision(before)
    assert clip_search.rounding_of(torch.float32) == clip_search.ROUNDING[torch.float32]
