"""Ways of finding the candidates of an exact CLIP range search: every bank row whose
computed inner product with a query is at least a floor.

Each method is one library's product over one copy of the bank rows:

- `faiss-scan`: Faiss `range_search_inner_product` over the float32 host rows, at its
  defaults: its SIMD scan, query by query, below `distance_compute_blas_threshold`
  queries, its BLAS path above;
- `numpy-float32`: NumPy's BLAS (OpenBLAS in the wheels) per block of host rows;
- `torch-float32`: `torch.matmul` per block of host rows (MKL on CPU);
- `torch-float16`: `torch.matmul` over a float16 copy (2 bytes a value): on CPU a
  vectorised GEMV for one query (F16C conversions as it reads), slow for more;
- `torch-bfloat16`: the same over a bfloat16 copy: oneDNN's GEMM with AVX512-BF16 or AMX
  on CPUs that have them;
- `cuda-float16`, `cuda-float32`: cuBLAS over a copy resident on the GPU.

None of them decides a hit: `clip_search` keeps every row within a proven rounding margin
(`candidate_margin`) of the threshold and checks each exactly. Which is fastest depends on
the device, the batch and the bank, so `clip_plan` measures them; this module only runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

# Scores computed per block (queries x bank rows). CPU: 2^20 float32 scores (4 MB) per
# product; measured at 1M x 768, batch 64, one thread: 2^18 and 2^20 equal (17-19 ms a
# query), 2^22 and 2^24 1.5-2 times slower (the scores outgrow the caches); two threads:
# 2^20 best of 2^16, 2^18 and 2^20 (small products pay for waking the threads); bfloat16
# at 200k x 768: 2^18, 2^20 and 2^22 within 5% of each other.
# CUDA: 2^26 (128 MB of float16) so that a batch of 64 covers a million rows in one
# product and one synchronisation.
BLOCK_SCORES = {"cpu": 1 << 20, "cuda": 1 << 26}


@dataclass(frozen=True)
class Method:
    name: str
    library: str  # "faiss", "numpy" or "torch"
    dtype: torch.dtype  # of the copy it multiplies
    device: str  # "cpu" or "cuda"

    @property
    def copy(self) -> tuple[str, torch.dtype]:
        """The copy of the bank it reads: (device, dtype)."""
        return self.device, self.dtype

    @property
    def reads_host_rows(self) -> bool:
        return self.copy == ("cpu", torch.float32)


FAISS_SCAN = Method("faiss-scan", "faiss", torch.float32, "cpu")
NUMPY_FLOAT32 = Method("numpy-float32", "numpy", torch.float32, "cpu")
TORCH_FLOAT32 = Method("torch-float32", "torch", torch.float32, "cpu")
TORCH_FLOAT16 = Method("torch-float16", "torch", torch.float16, "cpu")
TORCH_BFLOAT16 = Method("torch-bfloat16", "torch", torch.bfloat16, "cpu")
CUDA_FLOAT16 = Method("cuda-float16", "torch", torch.float16, "cuda")
CUDA_FLOAT32 = Method("cuda-float32", "torch", torch.float32, "cuda")
METHODS = {
    method.name: method
    for method in (
        FAISS_SCAN,
        NUMPY_FLOAT32,
        TORCH_FLOAT32,
        TORCH_FLOAT16,
        TORCH_BFLOAT16,
        CUDA_FLOAT16,
        CUDA_FLOAT32,
    )
}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux), empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def available(device: str) -> list[Method]:
    """The methods worth measuring on `device`. Half-precision products on a CPU only where
    it has instructions for them: F16C for float16 (a GEMV that converts as it reads),
    AVX512-BF16 or AMX for bfloat16 (elsewhere oneDNN emulates it, slower than float32)."""
    if torch.device(device).type == "cuda":
        return [CUDA_FLOAT16, CUDA_FLOAT32]
    flags = cpu_flags()
    methods = [FAISS_SCAN, NUMPY_FLOAT32, TORCH_FLOAT32]
    if "f16c" in flags:
        methods.append(TORCH_FLOAT16)
    if flags & {"avx512_bf16", "amx_bf16"}:
        methods.append(TORCH_BFLOAT16)
    return methods


def candidates(
    method: Method,
    queries: np.ndarray,
    host_rows: np.ndarray,
    scored: torch.Tensor,
    floor: float,
    block_scores: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(query, bank row) pairs whose product by `method` is >= floor, in query then row
    order. `host_rows`: the float32 rows; `scored`: the method's copy of them."""
    if not len(host_rows):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if method.library == "faiss":
        query_rows, bank_rows = _faiss_scan(queries, host_rows, floor)
    elif method.library == "numpy":
        block = _block(block_scores or BLOCK_SCORES["cpu"], len(queries))
        query_rows, bank_rows = _numpy_blocks(queries, host_rows, floor, block)
    else:
        device_type = scored.device.type
        block = _block(block_scores or BLOCK_SCORES.get(device_type, 1 << 20), len(queries))
        query_rows, bank_rows = _torch_blocks(queries, scored, floor, block)
    order = np.lexsort((bank_rows, query_rows))
    return query_rows[order], bank_rows[order]


def _block(block_scores: int, queries: int) -> int:
    return max(1, block_scores // queries)


def _faiss_scan(
    queries: np.ndarray, rows: np.ndarray, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    # Faiss keeps inner products strictly above the radius: one float32 step below the floor
    # keeps those equal to it too.
    radius = float(np.nextafter(np.float32(floor), np.float32(-np.inf)))
    # Faiss's OpenMP threads are set per calling thread: as many as torch's, so that every
    # method runs with the same threads (and a worker's task threads each get one team).
    faiss.omp_set_num_threads(torch.get_num_threads())
    result = faiss.RangeSearchResult(len(queries))
    faiss.range_search_inner_product(
        faiss.swig_ptr(queries),
        faiss.swig_ptr(rows),
        rows.shape[1],
        len(queries),
        len(rows),
        radius,
        result,
    )
    limits = faiss.rev_swig_ptr(result.lims, len(queries) + 1).copy()
    found = int(limits[-1])
    bank_rows = faiss.rev_swig_ptr(result.labels, found).copy().astype(np.int64)
    query_rows = np.repeat(
        np.arange(len(queries), dtype=np.int64), np.diff(limits).astype(np.int64)
    )
    return query_rows, bank_rows


def _numpy_blocks(
    queries: np.ndarray, rows: np.ndarray, floor: float, block: int
) -> tuple[np.ndarray, np.ndarray]:
    found_queries, found_rows = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    threshold = np.float32(floor)
    for start in range(0, len(rows), block):
        asked, hit = np.nonzero(queries @ rows[start : start + block].T >= threshold)
        found_queries.append(asked)
        found_rows.append(hit + start)
    return np.concatenate(found_queries), np.concatenate(found_rows)


def _torch_blocks(
    queries: np.ndarray, scored: torch.Tensor, floor: float, block: int
) -> tuple[np.ndarray, np.ndarray]:
    found_queries: list[torch.Tensor] = []
    found_rows: list[torch.Tensor] = []
    with torch.inference_mode():
        on_device = torch.from_numpy(queries).to(scored.device, scored.dtype)
        for start in range(0, len(scored), block):
            scores = torch.matmul(on_device, scored[start : start + block].T)
            # Compared in float32 (exact from float16 and bfloat16): a half-precision
            # threshold would itself be rounded.
            asked, hit = torch.nonzero(scores.float() >= floor, as_tuple=True)
            found_queries.append(asked)
            found_rows.append(hit + start)
        query_rows = torch.cat(found_queries).cpu().numpy()
        bank_rows = torch.cat(found_rows).cpu().numpy()
    return query_rows, bank_rows
