"""The general index at corpus scale: which Faiss index, at which setting, serves an analyst.

    python bench/search.py --sizes 20000 --queries 200          # quick: a minute
    nice -n 10 python bench/search.py                           # 100k and 1M, 768-d: ~1 h
    python bench/search.py --sizes 100000 --only flat hnsw      # some index types only
    python bench/search.py --merge a.json b.json --out all.json # one table and plot of runs
    python bench/search.py --sizes 100000 --only hnsw --backend both  # Faiss and Milvus
    python bench/search.py --sizes 300000 --only ivf-flat ivf-pq --backend both \
        --milvus-only ivf-sq8 ivf-pq                            # the service's IVF on Milvus

Data: synthetic CLIP-like embeddings (`ClusteredSphere`): a mixture of Gaussians on the
unit sphere whose noise has a power-law spectrum, so that the corpus has clusters, a low
intrinsic dimension and one common direction, as real CLIP image embeddings do. Uniform
random vectors in 768-d would be the worst case for every ANN index and unlike any real
corpus. The queries are fresh points of the same distribution, never in the indexed set.
The statistics of the generated data (cosine to the nearest neighbour, to the 10th, and
between random pairs) are measured and written with the results.

For each size: exact `IndexFlatIP` (the baseline, and the ground truth for recall@10),
HNSW (`IndexHNSWFlat`, M and efConstruction fixed, a sweep of efSearch), IVF-Flat and
IVF-PQ (nlist = 4 sqrt(N), the coarse quantizer trained once on a sample and shared by
both, a sweep of nprobe). Every ANN setting is measured twice: `raw` (top 10 of the index)
and `rerank` (the index's top 100 candidates rescored exactly from the float32 vectors,
then the top 10), which is how the search service serves. HNSW's `rerank` rows search with
efSearch >= 100, since Faiss does not widen the beam to k by itself.

Measured: recall@10 against exact (all queries, batched), latency one query at a time as
an analyst's request is (p50, p99, and QPS = 1 / mean), index bytes, RSS growth while
building, and build time (training and adding). Build threads: `--threads` (default: all
CPUs) for Faiss's OpenMP and OpenBLAS; searches are timed with Faiss's OpenMP at 1 thread,
as one request holds one thread in the service (Faiss searches a single query on one thread
for these indexes anyway). Printed as a table; JSON to `--out` (rewritten after every row,
so a stopped run keeps what it measured) and a recall-versus-QPS plot next to it (PNG).

HNSW's build is the slow part on few cores: `--hnsw-budget-s` stops adding once that much
time has passed; the vectors added so far are then searched (recall against exact over
the same prefix) and the row says `built_vectors` and the build time projected linearly
to the whole corpus (an underestimate: each insertion costs about log n).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]

K = 10
CANDIDATES = 100
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 100
EF_SEARCH = (16, 32, 64, 128, 256, 512)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Sub-quantizers of 8 bits, 8 dimensions each: at 768-d, 96 bytes a vector (1/32 of float32).
PQ_DIMS_PER_CODE = 8
# k-means on this many points per centroid, Faiss's minimum before it warns: at 1M and
# 4,000 lists, 156k points and 348 s on two loaded cores. More was not measured.
TRAIN_PER_LIST = 39
KMEANS_ITERATIONS = 10
TARGET_RECALL = 0.95
# Filtered searches: a filter passing rows whose row % 100 is below the value, against exact
# search over those rows. Faiss applies it afterwards and widens, as the service does.
SELECTIVITY = {"10%": 10, "1%": 1}
MAX_FILTERED_FRAMES = CANDIDATES * 64
TARGET_P99_MS = 10.0
CHUNK = 50_000


@dataclass(frozen=True)
class ClusteredSphere:
    """A mixture of Gaussians on the unit sphere shaped like CLIP image embeddings.

    A point is normalise(centre_c + NOISE * e), e = (z * spectrum[perm_c]) @ rotation, with
    z standard normal: each cluster's noise lies mostly in a few directions of its own (the
    power-law spectrum, permuted per cluster), so its intrinsic dimension is about 30
    (participation ratio of i**-1 over 768 dimensions: 31.7), not 768. The centres are
    normalise(mean + g_c): all embeddings share one direction, as CLIP's do (they fill a
    narrow cone, not the sphere), so that unrelated items have cosine about 0.4 rather
    than 0. Cluster sizes follow a Zipf law (a few large topics, many small ones).

    NOISE = 0.6 puts a point at cosine 1/sqrt(1.36) = 0.86 from its centre and gives, at
    100k points, a nearest neighbour at cosine about 0.85 and random pairs at about 0.4
    (measured and written with the results): near what CLIP ViT-L/14 shows on a corpus of
    photos (nearest neighbours at 0.8-0.9 unless near-duplicates, unrelated images at
    0.3-0.5). Those CLIP figures are from experience with public checkpoints, not measured
    here: no real checkpoint can be downloaded on this machine.
    """

    centres: Vectors
    weights: npt.NDArray[np.float64]
    rotation: Vectors
    spectra: Vectors  # one permuted spectrum per cluster

    NOISE = 0.6

    @classmethod
    def make(cls, size: int, dim: int, seed: int = 0) -> ClusteredSphere:
        rng = np.random.default_rng(seed)
        clusters = max(100, size // 1000)
        mean = _normalise(rng.standard_normal((1, dim), dtype=np.float32))
        centres = _normalise(mean + _normalise(rng.standard_normal((clusters, dim), np.float32)))
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.7
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        spectrum = np.arange(1, dim + 1, dtype=np.float64) ** -0.5
        spectrum /= np.linalg.norm(spectrum)
        spectra = np.stack([rng.permutation(spectrum) for _ in range(clusters)])
        return cls(
            centres,
            weights / weights.sum(),
            rotation.astype(np.float32),
            (spectra * math.sqrt(dim)).astype(np.float32),
        )

    def sample(self, count: int, seed: int) -> Iterator[Vectors]:
        """`count` points in chunks, so that 1M x 768 is never held twice."""
        rng = np.random.default_rng(seed)
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            cluster = rng.choice(len(self.centres), size=n, p=self.weights)
            z = rng.standard_normal((n, self.rotation.shape[0]), dtype=np.float32)
            z *= self.spectra[cluster]
            z /= math.sqrt(self.rotation.shape[0])
            points = z @ self.rotation
            points *= self.NOISE
            points += self.centres[cluster]
            yield _normalise(points)


def _normalise(x: Vectors) -> Vectors:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000, help="Held-out queries for recall.")
    parser.add_argument("--timed", type=int, default=1000, help="Queries timed per setting.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Build threads.")
    parser.add_argument(
        "--only", nargs="+", choices=["flat", "hnsw", "ivf-flat", "ivf-pq"], help="Index types."
    )
    parser.add_argument("--hnsw-budget-s", type=float, default=1800.0, help="HNSW build limit.")
    parser.add_argument(
        "--timed-budget-s", type=float, default=20.0, help="Timing limit per setting."
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/search.json"))
    parser.add_argument(
        "--backend",
        choices=["faiss", "milvus", "both"],
        default="faiss",
        help="Milvus rows (bench/search_milvus.py) beside or instead of Faiss's, same data.",
    )
    parser.add_argument(
        "--milvus-uri", help="A running Milvus; default: start the `milvus` wheel's server."
    )
    parser.add_argument(
        "--milvus-only",
        nargs="+",
        choices=["hnsw", "ivf-sq8", "ivf-pq"],
        default=["hnsw"],
        help="Milvus index types: HNSW with filters and freshness, or the service's IVF ones.",
    )
    parser.add_argument(
        "--milvus-ports",
        type=int,
        default=29_400,
        help="First of the 13 ports of the wheel's server (two runs on one machine differ).",
    )
    parser.add_argument(
        "--milvus-config",
        nargs="+",
        default=[],
        metavar="PATH=VALUE",
        help="Settings of the wheel's server, by their path in milvus.yaml "
        "(dataCoord.segment.sealProportion=1.0).",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="Measure nothing: merge these runs' JSON (one size each) into --out, and plot.",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # OpenBLAS reads its thread count once, when NumPy is first imported: numpy is imported
    # above, so set it for a fresh process with OPENBLAS_NUM_THREADS if it matters; it only
    # drives the batched ground truth and k-means here, not the timed searches.
    if args.merge:
        merge(args.merge, args.out)
        return
    import faiss

    kinds = args.only or ["flat", "hnsw", "ivf-flat", "ivf-pq"]
    results: dict[str, Any] = {
        "dim": args.dim,
        "k": K,
        "candidates": CANDIDATES,
        "build_threads": args.threads,
        "search_threads": 1,
        "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION},
        "ivf": {
            "nlist": "4*sqrt(N)",
            "train_per_list": TRAIN_PER_LIST,
            "pq_dims_per_code": PQ_DIMS_PER_CODE,
        },
        "noise": ClusteredSphere.NOISE,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {},
        "rows": [],
    }
    server = None
    if args.backend != "faiss":
        from search_milvus import Server

        overrides = dict(item.split("=", 1) for item in args.milvus_config)
        server = Server(args.milvus_uri, args.milvus_ports, dict(overrides))
        results["milvus_config"] = overrides
        results["milvus_uri"] = server.uri
    if args.backend == "milvus":
        kinds = []
    try:
        for size in args.sizes:
            run_size(size, args, kinds, results, server)
    finally:
        if server is not None:
            server.stop()
    print(f"written to {args.out} and {plot(results, args.out)}")
    print_recommendation(results)


def merge(runs: list[Path], out: Path) -> None:
    """One JSON and one plot from runs made separately (e.g. 1M alone, under its own nice)."""
    merged: dict[str, Any] = {}
    for run in runs:
        results = json.loads(run.read_text())
        if merged and results["dim"] != merged["dim"]:
            raise SystemExit(f"{run} is {results['dim']}-d, the others {merged['dim']}-d")
        rows = merged.get("rows", []) + results["rows"]
        data = {**merged.get("data", {}), **results["data"]}
        merged = {**results, "rows": rows, "data": data, "merged_from": [str(r) for r in runs]}
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"written to {out} and {plot(merged, out)}")
    print_recommendation(merged)


def run_size(
    size: int,
    args: argparse.Namespace,
    kinds: list[str],
    results: dict[str, Any],
    server: Any = None,
) -> None:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    shape = ClusteredSphere.make(size, args.dim, seed=size)
    queries = np.concatenate(list(shape.sample(args.queries, seed=size + 2)))
    # The exact index owns the corpus; `corpus` is a view of its storage, the float32
    # vectors the rerank reads (the service reads them from its own copy of the table).
    rss = _rss_mb()
    started = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    for chunk in shape.sample(size, seed=size + 1):
        flat.add(chunk)
    generated_s = time.perf_counter() - started
    corpus = faiss.rev_swig_ptr(flat.get_xb(), size * args.dim).reshape(size, args.dim)
    truth = exact_top(flat, queries, CANDIDATES)
    stats = data_stats(truth, corpus, queries)
    results["data"][str(size)] = stats
    print(
        f"\n{size} vectors x {args.dim}: generated in {generated_s:.0f} s; query to its "
        f"nearest neighbour cos {stats['nn1_cos']:.3f}, 10th {stats['nn10_cos']:.3f}, "
        f"random pair {stats['random_pair_cos']:.3f}",
        flush=True,
    )
    context = Context(size, corpus, queries, truth[1][:, :K], args, results)
    if "flat" in kinds:
        build = {"build_s": round(generated_s, 1), "rss_growth_mb": round(_rss_mb() - rss)}
        build["index_bytes"] = size * args.dim * 4
        context.measure("flat", "exact", flat, build, rerank=False, timed=min(args.timed, 200))
    # IVF before HNSW: HNSW's build is the one that may run out of its time budget.
    if "ivf-flat" in kinds or "ivf-pq" in kinds:
        run_ivf(context, kinds)
    if "hnsw" in kinds:
        run_hnsw(context)
    if server is not None:
        from search_milvus import run_milvus, run_milvus_ivf

        if "hnsw" in args.milvus_only:
            run_milvus(context, server)
        run_milvus_ivf(context, server, [k for k in args.milvus_only if k != "hnsw"])
    del context, corpus, flat
    gc.collect()


def exact_top(index: Any, queries: Vectors, k: int) -> tuple[Vectors, Ids]:
    scores, ids = index.search(queries, k)
    return scores, ids


def data_stats(truth: tuple[Vectors, Ids], corpus: Vectors, queries: Vectors) -> dict[str, float]:
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(corpus), (2, 10_000))
    random_pair = np.einsum("ij,ij->i", corpus[pairs[0]], corpus[pairs[1]])
    scores = truth[0]
    return {
        "nn1_cos": round(float(scores[:, 0].mean()), 4),
        "nn10_cos": round(float(scores[:, K - 1].mean()), 4),
        "nn100_cos": round(float(scores[:, CANDIDATES - 1].mean()), 4),
        "random_pair_cos": round(float(random_pair.mean()), 4),
        "random_pair_cos_p99": round(float(np.quantile(random_pair, 0.99)), 4),
        "query_to_random_cos": round(float((queries @ corpus[pairs[0][:1000]].T).mean()), 4),
    }


@dataclass
class Context:
    size: int
    corpus: Vectors
    queries: Vectors
    truth: Ids
    args: argparse.Namespace
    results: dict[str, Any]

    def measure(
        self,
        kind: str,
        setting: str,
        index: Any,
        build: dict[str, Any],
        rerank: bool,
        timed: int | None = None,
        truth: Ids | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        import faiss

        expected = self.truth if truth is None else truth
        corpus = self.corpus if truth is None else self.corpus[: index.ntotal]
        faiss.omp_set_num_threads(self.args.threads)
        found = search(index, corpus, self.queries, rerank)
        recall = float(
            np.mean([len(set(f) & set(e)) / K for f, e in zip(found, expected, strict=True)])
        )
        faiss.omp_set_num_threads(1)
        latencies = time_single(
            index, corpus, self.queries, rerank, timed or self.args.timed, self.args.timed_budget_s
        )
        row = self.record_row(kind, setting, rerank, recall, latencies, {**build, **(extra or {})})
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.results, indent=2) + "\n")
        return row

    def record_row(
        self,
        kind: str,
        setting: str,
        rerank: bool,
        recall: float,
        latencies: np.ndarray,
        extra: dict[str, Any],
        *,
        first: bool | None = None,
    ) -> dict[str, Any]:
        """One measured configuration: recall, throughput and the (wall, CPU) ms per query
        of `latencies`, kept and printed (with the header when `first`, by default when it
        is the run's first row)."""
        row: dict[str, Any] = {
            "size": self.size,
            "kind": kind,
            "setting": setting,
            "rerank": rerank,
            "recall_at_10": round(recall, 4),
            "qps": round(1000 / float(latencies[:, 0].mean()), 1),
            "p50_ms": round(float(np.percentile(latencies[:, 0], 50)), 3),
            "p99_ms": round(float(np.percentile(latencies[:, 0], 99)), 3),
            # The query's own CPU time: what the wall time would be on an idle machine,
            # where preemption by other processes does not stretch it.
            "p50_cpu_ms": round(float(np.percentile(latencies[:, 1], 50)), 3),
            "p99_cpu_ms": round(float(np.percentile(latencies[:, 1], 99)), 3),
            "timed_queries": len(latencies),
            **extra,
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
        self.results["rows"].append(row)
        print_row(row, first=len(self.results["rows"]) == 1 if first is None else first)
        return row


def search(index: Any, corpus: Vectors, queries: Vectors, rerank: bool) -> Ids:
    """Top 10 ids per query: the index's own, or its top 100 rescored exactly."""
    if not rerank:
        return np.asarray(index.search(queries, K)[1])
    _, candidates = index.search(queries, CANDIDATES)
    return np.stack(
        [rescore(corpus, query, row) for query, row in zip(queries, candidates, strict=True)]
    )


def rescore(corpus: Vectors, query: Vectors, candidates: Ids) -> Ids:
    candidates = candidates[candidates >= 0]
    scores = corpus[candidates] @ query
    top = np.argpartition(-scores, K)[:K] if len(scores) > K else np.arange(len(scores))
    best = candidates[top[np.argsort(-scores[top])]]
    # Fewer than K candidates (a few short IVF lists probed): -1 pads, as Faiss does.
    return np.pad(best, (0, K - len(best)), constant_values=-1)


def time_single(
    index: Any, corpus: Vectors, queries: Vectors, rerank: bool, count: int, budget_s: float
) -> npt.NDArray[np.float64]:
    """Milliseconds per query, one query per call, as the service answers a request: wall
    time and the calling thread's CPU time (Faiss at one OpenMP thread runs the search on
    the calling thread) in two columns."""
    one = queries[:1]
    index.search(one, CANDIDATES if rerank else K)  # warm-up: first touch, thread pool
    latencies: list[tuple[float, float]] = []
    budget_end = time.perf_counter() + budget_s
    for i in range(count):
        query = queries[i % len(queries)][None, :]
        started, started_cpu = time.perf_counter(), time.thread_time()
        if rerank:
            rescore(corpus, query[0], index.search(query, CANDIDATES)[1][0])
        else:
            index.search(query, K)
        ended_cpu, ended = time.thread_time(), time.perf_counter()
        latencies.append((1000 * (ended - started), 1000 * (ended_cpu - started_cpu)))
        if time.perf_counter() > budget_end and len(latencies) >= 20:
            break
    return np.asarray(latencies)


def run_hnsw(ctx: Context) -> None:
    import faiss

    faiss.omp_set_num_threads(ctx.args.threads)
    rss = _rss_mb()
    index = faiss.IndexHNSWFlat(ctx.corpus.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    started = time.perf_counter()
    projected = 0.0
    for start in range(0, ctx.size, CHUNK):
        index.add(ctx.corpus[start : start + CHUNK])
        elapsed = time.perf_counter() - started
        # Each insertion costs about log(n) more as the graph grows; projecting linearly
        # from the rate so far underestimates slightly (noted in the row).
        projected = elapsed / index.ntotal * ctx.size
        print(
            f"  hnsw: {index.ntotal} added in {elapsed:.0f} s (projected {projected:.0f} s)",
            flush=True,
        )
        if elapsed > ctx.args.hnsw_budget_s and index.ntotal < ctx.size:
            break
    build_s = time.perf_counter() - started
    graph: Any = index.hnsw  # Faiss's stubs leave out the graph's arrays
    build: dict[str, Any] = {
        "build_s": round(build_s, 1),
        "rss_growth_mb": round(_rss_mb() - rss),
        "index_bytes": index.ntotal * ctx.corpus.shape[1] * 4
        + graph.neighbors.size() * 4
        + graph.offsets.size() * 8
        + graph.levels.size() * 4,
        "built_vectors": int(index.ntotal),
    }
    truth = None
    if index.ntotal < ctx.size:
        build["build_s_projected"] = round(projected)
        subset = faiss.IndexFlatIP(ctx.corpus.shape[1])
        subset.add(ctx.corpus[: index.ntotal])
        truth = exact_top(subset, ctx.queries, K)[1]
        del subset
    # Faiss 1.15 searches with efSearch even when asked for more results (k=100, ef 16:
    # the same top 10 as k=10, measured), so the rerank's 100 candidates need ef >= 100.
    settings = [(ef, False) for ef in EF_SEARCH]
    settings += [(ef, True) for ef in sorted({max(ef, CANDIDATES) for ef in EF_SEARCH})]
    for ef, rerank in settings:
        index.hnsw.efSearch = ef
        ctx.measure(
            "hnsw",
            f"M{HNSW_M} efC{HNSW_EF_CONSTRUCTION} ef{ef}",
            index,
            build,
            rerank,
            truth=truth,
            extra={"efSearch": ef},
        )
    if truth is None:  # the whole corpus was indexed
        for label, buckets in SELECTIVITY.items():
            measure_filtered(ctx, index, 128, label, buckets, build)
    del index
    gc.collect()


def passes_filter(size: int, buckets: int) -> npt.NDArray[np.bool_]:
    """Which rows the benchmark's filter passes: `row % 100 < buckets` (on Milvus, the
    field `bucket` holds row % 100)."""
    return np.arange(size) % 100 < buckets


def filtered_truth(ctx: Context, buckets: int) -> Ids:
    """The exact top K of each query among the rows passing the filter `row % 100 < buckets`."""
    passing = np.nonzero(passes_filter(ctx.size, buckets))[0]
    scores = ctx.queries @ ctx.corpus[passing].T
    return passing[np.argsort(-scores, axis=1)[:, :K]]


def faiss_filtered(index: Any, corpus: Vectors, query: Vectors, passes: Any, ef: int) -> Ids:
    """A filtered search as the service makes it on Faiss (`service.search`): the nearest
    frames, filtered afterwards (in PostgreSQL there), four times more of them until K
    pass, then rescored exactly."""
    frames = CANDIDATES
    while True:
        index.hnsw.efSearch = max(ef, frames)
        found = index.search(query[None, :], frames)[1][0]
        kept = found[found >= 0]
        kept = kept[passes[kept]]
        if len(kept) >= K or frames >= MAX_FILTERED_FRAMES:
            return rescore(corpus, query, kept)
        frames *= 4


def measure_filtered(
    ctx: Context, index: Any, ef: int, label: str, buckets: int, build: dict[str, Any]
) -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    passes = passes_filter(ctx.size, buckets)
    found = [faiss_filtered(index, ctx.corpus, q, passes, ef) for q in ctx.queries]
    truth = filtered_truth(ctx, buckets)
    recall = float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, truth, strict=True)]))
    latencies = []
    for i in range(min(ctx.args.timed, 200)):  # as many as the Milvus rows time
        query = ctx.queries[i % len(ctx.queries)]
        started, started_cpu = time.perf_counter(), time.thread_time()
        faiss_filtered(index, ctx.corpus, query, passes, ef)
        ended_cpu, ended = time.thread_time(), time.perf_counter()
        latencies.append((1000 * (ended - started), 1000 * (ended_cpu - started_cpu)))
    ctx.record_row(
        "hnsw",
        f"ef{ef} filter {label} after",
        True,
        recall,
        np.asarray(latencies),
        {**build, "efSearch": ef, "filter": label},
    )
    ctx.args.out.write_text(json.dumps(ctx.results, indent=2) + "\n")


def run_ivf(ctx: Context, kinds: list[str]) -> None:
    import faiss

    faiss.omp_set_num_threads(ctx.args.threads)
    dim = ctx.corpus.shape[1]
    nlist = int(4 * math.sqrt(ctx.size))
    rng = np.random.default_rng(1)
    sample = ctx.corpus[
        np.sort(rng.choice(ctx.size, min(ctx.size, TRAIN_PER_LIST * nlist), replace=False))
    ]
    started = time.perf_counter()
    kmeans = faiss.Kmeans(dim, nlist, niter=KMEANS_ITERATIONS, spherical=True, seed=1)
    kmeans.train(sample)
    quantizer = faiss.IndexFlatIP(dim)
    assert kmeans.centroids is not None
    quantizer.add(kmeans.centroids)
    trained_s = time.perf_counter() - started
    # One assignment of the corpus to its lists, shared by IVF-Flat and IVF-PQ.
    started = time.perf_counter()
    assign = np.concatenate(
        [quantizer.search(ctx.corpus[s : s + CHUNK], 1)[1][:, 0] for s in range(0, ctx.size, CHUNK)]
    )
    assigned_s = time.perf_counter() - started
    print(
        f"  ivf: {nlist} lists trained in {trained_s:.0f} s, corpus assigned in {assigned_s:.0f} s",
        flush=True,
    )
    for kind in ("ivf-flat", "ivf-pq"):
        if kind not in kinds:
            continue
        rss = _rss_mb()
        started = time.perf_counter()
        index: Any
        if kind == "ivf-flat":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            pq_m = dim // PQ_DIMS_PER_CODE
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            index.train(sample)  # the quantizer is trained: this trains the PQ only
        index.is_trained = True
        for s in range(0, ctx.size, CHUNK):
            # Named, not temporaries: swig_ptr holds no reference to its array.
            block = np.ascontiguousarray(ctx.corpus[s : s + CHUNK])
            ids = np.arange(s, s + len(block), dtype=np.int64)
            lists = np.ascontiguousarray(assign[s : s + CHUNK])
            index.add_core(
                len(block), faiss.swig_ptr(block), faiss.swig_ptr(ids), faiss.swig_ptr(lists)
            )
        own_s = time.perf_counter() - started
        index_bytes = nlist * dim * 4 + index.ntotal * (index.code_size + 8)
        if kind == "ivf-pq":
            index_bytes += 256 * dim * 4  # the PQ's centroids
        build = {
            "build_s": round(trained_s + assigned_s + own_s, 1),
            "train_s": round(trained_s, 1),
            "rss_growth_mb": round(_rss_mb() - rss),
            "index_bytes": index_bytes,
            "nlist": nlist,
        }
        for nprobe in NPROBE:
            if nprobe > nlist:
                continue
            index.nprobe = nprobe
            for rerank in (False, True):
                ctx.measure(
                    kind,
                    f"nlist{nlist} nprobe{nprobe}",
                    index,
                    build,
                    rerank,
                    extra={"nprobe": nprobe},
                )
        del index
        gc.collect()


def print_row(row: dict[str, Any], first: bool) -> None:
    if first:
        print(
            f"{'size':>8} {'index':<8} {'setting':<22} {'rerank':<6} {'recall@10':>9} "
            f"{'qps':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99 cpu':>8} {'MB':>7} {'build s':>8}"
        )
    meets = {"wall": "  <- target", "cpu": "  <- target on CPU time"}.get(meets_target(row), "")
    print(
        f"{row['size']:>8} {row['kind']:<8} {row['setting']:<22} "
        f"{'yes' if row['rerank'] else 'no':<6} {row['recall_at_10']:>9.3f} {row['qps']:>8.0f} "
        f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['p99_cpu_ms']:>8.2f} "
        f"{row['index_bytes'] / 2**20:>7.0f} {row['build_s']:>8.0f}{meets}",
        flush=True,
    )


def meets_target(row: dict[str, Any]) -> str:
    """'wall' when recall and wall-clock p99 meet the target, 'cpu' when only the p99 of
    CPU time does (the machine was busy), '' when neither."""
    if row["recall_at_10"] < TARGET_RECALL:
        return ""
    if row["p99_ms"] < TARGET_P99_MS:
        return "wall"
    return "cpu" if row["p99_cpu_ms"] < TARGET_P99_MS else ""


def print_recommendation(results: dict[str, Any]) -> None:
    """Per size: the fastest setting (by p99 CPU time) of each index type meeting the target."""
    for size in sorted({row["size"] for row in results["rows"]}):
        print(f"\nat {size}: recall@10 >= {TARGET_RECALL}, p99 < {TARGET_P99_MS} ms; by CPU p99:")
        for kind in ("flat", "hnsw", "ivf-flat", "ivf-pq"):
            meeting = [
                row
                for row in results["rows"]
                if row["size"] == size and row["kind"] == kind and meets_target(row)
            ]
            # By CPU time: on a shared host the wall-clock figures are mostly preemption.
            best = min(meeting, key=lambda row: row["p99_cpu_ms"], default=None)
            partial = ""
            if best and best.get("built_vectors", size) < size:
                partial = f" [graph of the first {best['built_vectors']} vectors only]"
            print(
                f"  {kind:<8} "
                + (
                    f"{best['setting']} rerank={best['rerank']}: {best['qps']:.0f} qps, "
                    f"p99 {best['p99_ms']:.2f} ms (CPU time {best['p99_cpu_ms']:.2f} ms){partial}"
                    if best
                    else "none"
                )
            )


COLOURS = {"hnsw": "tab:blue", "ivf-flat": "tab:green", "ivf-pq": "tab:red"}


def plot(results: dict[str, Any], out: Path) -> Path:
    """Recall@10 against queries per second on one core, one panel per size. The speed is
    1000 / the median CPU ms of a query: on a shared host the wall-clock QPS (in the
    table) mostly measures the other processes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def speed(row: dict[str, Any]) -> float:
        return 1000 / max(float(row["p50_cpu_ms"]), 1e-3)

    sizes = sorted({row["size"] for row in results["rows"]})
    figure, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 5), squeeze=False)
    for axis, size in zip(axes[0], sizes, strict=True):
        rows = [row for row in results["rows"] if row["size"] == size]
        for kind, colour in COLOURS.items():
            for rerank in (False, True):
                line = [row for row in rows if row["kind"] == kind and row["rerank"] == rerank]
                if line:
                    axis.plot(
                        [row["recall_at_10"] for row in line],
                        [speed(row) for row in line],
                        marker="o" if rerank else ".",
                        color=colour,
                        linestyle="-" if rerank else ":",
                        label=f"{kind}{' + rerank 100' if rerank else ''}",
                    )
        for row in rows:
            if row["kind"] == "flat":
                axis.scatter(
                    [1.0], [speed(row)], marker="*", s=150, color="black", label="exact (flat)"
                )
        axis.axvline(TARGET_RECALL, color="grey", linewidth=0.8)
        axis.axhline(1000 / TARGET_P99_MS, color="grey", linewidth=0.8, linestyle="--")
        axis.set(
            xlabel="recall@10 against exact",
            ylabel="queries/s on one core (1000 / median CPU ms)",
            yscale="log",
            title=f"{size:,} vectors x {results['dim']}",
        )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = out.with_suffix(".png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


if __name__ == "__main__":
    main()
