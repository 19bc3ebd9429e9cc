"""The Milvus side of bench/search.py (`--backend milvus|both`): the same corpus and queries
in a Milvus collection, measured the way the Faiss rows are, in the same run.

Server: `--milvus-uri` (a cluster, or a server you started), or else the Milvus 2.3.5
standalone from PyPI's `milvus` wheel, started here in a temporary directory on ports from
`--milvus-ports` (29400: below Linux's ephemeral ports, which a client socket may hold;
tests/milvus_server.py) and stopped at the end; only then are its memory and CPU read (from
/proc, the server's process).

Rows: `milvus-hnsw` (M and efConstruction as Faiss's HNSW, a sweep of ef; raw top 10 and
the top 100 rescored exactly, as the service serves), with the server's CPU per query next
to the client's; recall at 10% and 1% filter selectivity (a scalar field, against exact
search over the passing rows), served as the service serves it (`MilvusIndex.search`: a
window of nearest rows filtered by Milvus, its multiple of 100 tuned on stored vectors as
the service tunes it, then Milvus's filtered search where too few pass) and, in the same
run, Milvus's filtered search alone (window 0); ingest (insert + flush), index build and
load times, and how long the loaded server took to be quiet (it may compact segments and
index the merged ones first; searches are timed after), with the segments it serves; the
server's RSS growth; and freshness: seconds from an insert returning to the row being found
by a search at Bounded consistency (the service's default), and from a delete to it being
gone.

Rows `milvus-ivf_sq8` and `milvus-ivf_pq` (`--milvus-only ivf-sq8 ivf-pq`): the IVF indexes
the service builds at or above MODERATION_SEARCH_HNSW_MAX, with its own parameters
(`MilvusPlan.index_for`: nlist 4 sqrt(N); IVF_PQ with m = d / 8, as `--only ivf-pq` on Faiss),
its own schema (`create_collection`: the service's scalar fields, empty) and its own writes
(upserts), each in a collection of its own, dropped before the next is made. The server's
RSS is read from the empty collection to all rows indexed (`rss_growth_mb`, as the HNSW row's)
and, after a restart, before and after the load (`rss_before_load_mb`, `load_rss_mb`); on the
wheel's standalone neither is the collection's memory (docs/milvus.md, Sizing: a restarted
server holds, then frees, hundreds of MB while it recovers, and one that has ingested reuses
what it freed), so the rows keep them as read, beside `segments` (one IVF per segment). Searches
run at the nprobe the service's tuning picks (`MilvusIndex.tune` on 200 stored vectors against
exact search, as `moderation index sync` does), raw and with the top 100 rescored exactly.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moderation.search.milvus_index import (
    Milvus,
    MilvusIndex,
    MilvusPlan,
    MilvusSettings,
    create_collection,
    drop_collection,
    load_collection,
)
from moderation.search.vector_index import IndexRows

if TYPE_CHECKING:
    from search import Context

# (ef, window multiple): Milvus's filtered search alone at two ef, then the service's.
FILTERED_SETTINGS = ((128, 0), (256, 0), (128, None))
INSERT_CHUNK = 5_000
FRESHNESS_TRIES = 5
# Stored vectors the service's tuning measures recall on (MODERATION_SEARCH_TUNING_QUERIES).
TUNING_QUERIES = 200
# The server is quiet, and searches may be timed, once it uses under this much CPU (cores)
# over this many seconds.
QUIET_CORES = 0.25
QUIET_WINDOW_S = 5.0


def _proc_stat(pid: int) -> tuple[float, float]:
    """(RSS MB, CPU seconds user+system) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks


class Server:
    """The Milvus to measure: given by URI, or the wheel's standalone started here."""

    def __init__(
        self, uri: str | None, port_base: int = 29_400, overrides: dict[str, object] | None = None
    ) -> None:
        """`overrides`: the wheel's server settings to change (its milvus.yaml, by path)."""
        self.uri = uri
        self.process: Any = None
        if uri is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.milvus_server import MilvusProcess

            self.process = MilvusProcess(
                Path(tempfile.mkdtemp(prefix="bench-milvus-")), port_base, overrides or {}
            )
            started = time.perf_counter()
            self.process.start()
            self.uri = self.process.uri
            print(f"  milvus: started the wheel's server in {time.perf_counter() - started:.0f} s")

    def stat(self) -> tuple[float, float] | None:
        if self.process is None or self.process.process is None:
            return None
        return _proc_stat(self.process.process.pid)

    def settle(self, timeout_s: float = 900.0) -> float:
        """Seconds until the wheel's server is quiet (under `QUIET_CORES` of CPU over
        `QUIET_WINDOW_S`): a loaded collection may still be compacted and its new segments
        indexed, and searches timed meanwhile share the cores with that. 0 for a server by
        URI, whose work cannot be seen from here."""
        started = time.perf_counter()
        last = self.stat()
        while last is not None and time.perf_counter() - started < timeout_s:
            time.sleep(QUIET_WINDOW_S)
            now = self.stat()
            assert now is not None
            if (now[1] - last[1]) / QUIET_WINDOW_S < QUIET_CORES:
                break
            last = now
        return time.perf_counter() - started if last is not None else 0.0

    def restart(self) -> bool:
        """Stop and start the wheel's server on the same data; False for a server by URI."""
        if self.process is None:
            return False
        self.process.stop()
        self.process.start()
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(crash=True)


def run_milvus(ctx: Context, server: Server) -> None:
    from pymilvus import DataType, MilvusClient
    from search import (
        CANDIDATES,
        EF_SEARCH,
        HNSW_EF_CONSTRUCTION,
        HNSW_M,
        SELECTIVITY,
        K,
        filtered_truth,
    )

    client = MilvusClient(uri=server.uri, timeout=600)
    name = f"bench_{ctx.size}_{int(time.time())}"
    dim = ctx.corpus.shape[1]
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("upload_id", DataType.INT64)  # read by MilvusIndex.search
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("bucket", DataType.INT64)
    client.create_collection(name, schema=schema, consistency_level="Bounded")
    before = server.stat()
    started = time.perf_counter()
    for start in range(0, ctx.size, INSERT_CHUNK):
        chunk = ctx.corpus[start : start + INSERT_CHUNK]
        client.insert(
            name,
            [
                {
                    "id": start + i,
                    "upload_id": start + i,
                    "vector": v.tolist(),
                    "bucket": (start + i) % 100,
                }
                for i, v in enumerate(chunk)
            ],
        )
    client.flush(name)
    ingest_s = time.perf_counter() - started
    params = client.prepare_index_params()
    params.add_index(
        field_name="vector",
        index_type="HNSW",
        metric_type="IP",
        params={"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION},
    )
    started = time.perf_counter()
    client.create_index(name, params)
    _wait_indexed(client, name, ctx.size)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    client.load_collection(name)
    load_s = time.perf_counter() - started
    after = server.stat()
    settled_s = server.settle()
    segments = len(client.list_loaded_segments(name))
    print(
        f"  milvus: ingested {ctx.size} in {ingest_s:.0f} s, index built in {build_s:.0f} s, "
        f"loaded in {load_s:.0f} s, {segments} segments, quiet {settled_s:.0f} s later",
        flush=True,
    )
    build: dict[str, Any] = {
        "build_s": round(build_s, 1),
        "ingest_s": round(ingest_s, 1),
        "load_s": round(load_s, 1),
        "settled_s": round(settled_s, 1),
        "segments": segments,
        # The server's RSS growth from the empty collection to the loaded index: the closest
        # to Faiss's index bytes that can be read from outside.
        "index_bytes": int((after[0] - before[0]) * 2**20) if after and before else 0,
        "rss_growth_mb": round(after[0] - before[0]) if after and before else None,
        "backend": "milvus",
    }

    def searcher(ef: int, expression: str = "") -> Any:
        def run(queries: np.ndarray, limit: int) -> list[list[int]]:
            hits = client.search(
                name,
                data=queries.tolist(),
                limit=limit,
                filter=expression,
                search_params={"metric_type": "IP", "params": {"ef": max(ef, limit)}},
            )
            return [[int(h["id"]) for h in row] for row in hits]

        return run

    settings = [(ef, False) for ef in EF_SEARCH if ef >= K]
    settings += [(ef, True) for ef in sorted({max(ef, CANDIDATES) for ef in EF_SEARCH})]
    for ef, rerank in settings:
        _measure(
            ctx,
            server,
            searcher(ef),
            rerank,
            ctx.truth,
            "milvus-hnsw",
            f"M{HNSW_M} efC{HNSW_EF_CONSTRUCTION} ef{ef}",
            {**build, "ef": ef},
        )
    tuned = _tuned_filtered_window(ctx, service_index(server, name, dim, {"index_type": "HNSW"}))
    for label, buckets in SELECTIVITY.items():
        expression = f"bucket < {buckets}"  # the field `bucket` is row % 100
        truth = filtered_truth(ctx, buckets)
        for ef, window in FILTERED_SETTINGS:
            run = served(
                service_index(server, name, dim, {"index_type": "HNSW", "ef": ef}),
                expression,
                tuned if window is None else window,
            )
            shown = tuned if window is None else window
            _measure(
                ctx,
                server,
                run,
                True,
                truth,
                "milvus-hnsw",
                f"ef{ef} filter {label} window {shown}",
                {**build, "ef": ef, "filter": label, "filtered_window": shown},
            )
    fresh = _freshness(client, name, ctx)
    ctx.results.setdefault("milvus_freshness", {})[str(ctx.size)] = fresh
    ctx.args.out.write_text(json.dumps(ctx.results, indent=2) + "\n")
    print(
        f"  milvus freshness (Bounded): insert to searchable p50 {fresh['insert_p50_s']:.2f} s "
        f"(max {fresh['insert_max_s']:.2f}), delete to gone p50 {fresh['delete_p50_s']:.2f} s",
        flush=True,
    )
    client.drop_collection(name)
    client.close()


def _tuned_filtered_window(ctx: Context, index: MilvusIndex) -> int:
    """The window multiple the service's tuning picks for filtered searches
    (`MilvusIndex.tune_filtered`, as `milvus_sync.tune_collection` runs it): measured on
    stored vectors at 10% and 1% selectivity, the larger of the two kept."""
    from search import CANDIDATES, SELECTIVITY, TARGET_RECALL, K, passes_filter

    from moderation.search.indexes import exact_top_k

    queries = _tuning_queries(ctx)
    for label, buckets in SELECTIVITY.items():
        passing = np.nonzero(passes_filter(ctx.size, buckets))[0]
        exact = exact_top_k(queries, ctx.corpus, K, rows=passing)[0]
        index.tune_filtered(
            queries,
            exact,
            _exact_rescore(ctx),
            expression=f"bucket < {buckets}",
            label=label,
            target=TARGET_RECALL,
            k=K,
            candidates=CANDIDATES,
        )
    window = int(index.parameters["filtered_window"])
    print(f"  milvus: filtered searches tuned to a window of {window} x {CANDIDATES}", flush=True)
    return window


def _tuning_queries(ctx: Context) -> np.ndarray:
    """The stored vectors the service tunes on (`milvus_sync.tune_collection`); recall is
    then measured on the held-out queries, as for every other row."""
    stored = np.random.default_rng(0).choice(ctx.size, TUNING_QUERIES, replace=False)
    return ctx.corpus[np.sort(stored)]


def _exact_rescore(ctx: Context) -> Any:
    """Scores of candidate rows against their queries, as the service's rescore reads them."""

    def rescore(ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
        scores = np.einsum("qcd,qd->qc", ctx.corpus[np.maximum(ids, 0)], queries)
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32)

    return rescore


def run_milvus_ivf(ctx: Context, server: Server, kinds: list[str]) -> None:
    """The service's IVF_SQ8 and IVF_PQ collections (`kinds`: ivf-sq8, ivf-pq), one at a
    time, each dropped before the next is made (module docstring)."""
    from search import K

    from moderation.search.indexes import exact_top_k

    tuning_queries = _tuning_queries(ctx)
    tuning = (tuning_queries, exact_top_k(tuning_queries, ctx.corpus, K)[0])
    for kind in kinds:
        _measure_ivf(ctx, server, kind, tuning)


def _measure_ivf(
    ctx: Context, server: Server, kind: str, tuning: tuple[np.ndarray, np.ndarray]
) -> None:
    """One IVF collection as the service makes it: memory, ingest and build, and searches
    at the nprobe its tuning picks."""
    from search import (
        CANDIDATES,
        HNSW_EF_CONSTRUCTION,
        HNSW_M,
        PQ_DIMS_PER_CODE,
        TARGET_RECALL,
        K,
    )

    dim = ctx.corpus.shape[1]
    # hnsw_max 0: the branch the service takes at or above MODERATION_SEARCH_HNSW_MAX.
    pq_m = dim // PQ_DIMS_PER_CODE if kind == "ivf-pq" else 0
    plan = MilvusPlan(0, HNSW_M, HNSW_EF_CONSTRUCTION, ivf_nlist=None, ivf_pq_m=pq_m)
    parameters = plan.index_for(ctx.size, dim)
    name = f"bench_{kind.replace('-', '_')}_{ctx.size}_{int(time.time())}"
    index = service_index(server, name, dim, parameters)
    empty = server.stat()
    create_collection(index.milvus, name, dim, parameters)
    started = time.perf_counter()
    for start in range(0, ctx.size, INSERT_CHUNK):
        ids = np.arange(start, min(start + INSERT_CHUNK, ctx.size), dtype=np.int64)
        index.upsert(IndexRows(ids, ids, ctx.corpus[start : start + INSERT_CHUNK]))
    index.milvus.call("flush", lambda client: client.flush(name))
    ingest_s = time.perf_counter() - started
    index.milvus.call("wait for the index", lambda client: _wait_indexed(client, name, ctx.size))
    indexed_s = time.perf_counter() - started
    built = server.stat()
    index.milvus.call("release", lambda client: client.release_collection(name))
    if server.restart():  # a fresh process: no build or ingest buffers left in it
        index = service_index(server, name, dim, parameters)
        time.sleep(5)  # a started server is still setting up its components for a moment
    rested = server.stat()
    started = time.perf_counter()
    load_collection(index.milvus, name)
    load_s = time.perf_counter() - started
    loaded = server.stat()
    segments = index.milvus.call("list segments", lambda c: c.list_loaded_segments(name))

    index.tune(*tuning, _exact_rescore(ctx), target=TARGET_RECALL, k=K, candidates=CANDIDATES)
    build: dict[str, Any] = {
        "backend": "milvus",
        "ingest_s": round(ingest_s, 1),
        # Upserts and flush to every row in an indexed segment: the service's index is made
        # with the collection, so segments are indexed as they seal, during the ingest.
        "build_s": round(indexed_s, 1),
        "load_s": round(load_s, 1),
        # Milvus builds one IVF of nlist lists per segment, and probes nprobe in each.
        "segments": len(segments),
        "index_bytes": 0,  # unknown for a server given by URI
        **index.parameters,
    }
    if empty and built and rested and loaded:
        build |= {
            "rss_growth_mb": round(built[0] - empty[0]),
            "rss_before_load_mb": round(rested[0]),
            "load_rss_mb": round(loaded[0] - rested[0]),
            "index_bytes": int((loaded[0] - rested[0]) * 2**20),
        }
    print(f"  milvus {kind}: {json.dumps(build)}", flush=True)
    setting = f"nlist{parameters['params']['nlist']} nprobe{index.parameters['nprobe']}"
    for rerank in (False, True):
        _measure(ctx, server, served(index), rerank, ctx.truth, f"milvus-{kind}", setting, build)
    ctx.args.out.write_text(json.dumps(ctx.results, indent=2) + "\n")
    drop_collection(index.milvus, name)


def _wait_indexed(client: Any, name: str, size: int) -> None:
    while int(client.describe_index(name, "vector").get("indexed_rows", 0)) < size:
        time.sleep(0.5)


def service_index(server: Server, name: str, dim: int, parameters: dict[str, Any]) -> MilvusIndex:
    """The service's view of the bench's collection `name`, with index `parameters`."""
    assert server.uri is not None
    milvus = Milvus(MilvusSettings(server.uri, None, "default", 600.0, "Bounded", "bench", 1))
    index = MilvusIndex(milvus, model_id=0, model_name="bench", dim=dim, parameters=parameters)
    index.alias = name
    return index


def served(index: MilvusIndex, expression: str = "", window: int | None = None) -> Any:
    """Searches as the service makes them, through `MilvusIndex.search` (its `window` for
    filtered ones: None for the default, 0 for Milvus's filter alone)."""

    def run(queries: np.ndarray, limit: int) -> list[list[int]]:
        _, ids, _ = index.search(queries, limit, expression=expression, window=window)
        return [[int(i) for i in row if i >= 0] for row in ids]

    return run


def _top(
    run: Any,
    corpus: np.ndarray,
    queries: np.ndarray,
    rerank: bool,
    candidates: int,
    k: int,
    rescore: Any,
) -> list[list[int]]:
    out = []
    for start in range(0, len(queries), 50):
        batch = queries[start : start + 50]
        ids = run(batch, candidates if rerank else k)
        for query, row in zip(batch, ids, strict=True):
            if rerank:
                out.append(rescore(corpus, query, np.asarray(row, dtype=np.int64)).tolist())
            else:
                out.append(row[:k])
    return out


def _time_single(
    run: Any, ctx: Context, rerank: bool, server: Server
) -> tuple[np.ndarray, float | None]:
    from search import CANDIDATES, K, rescore

    run(ctx.queries[:1], K)  # warm-up
    count = min(ctx.args.timed, 200)
    latencies = []
    before = server.stat()
    for i in range(count):
        query = ctx.queries[i % len(ctx.queries)][None, :]
        started, started_cpu = time.perf_counter(), time.thread_time()
        ids = run(query, CANDIDATES if rerank else K)[0]
        if rerank:
            rescore(ctx.corpus, query[0], np.asarray(ids, dtype=np.int64))
        ended_cpu, ended = time.thread_time(), time.perf_counter()
        latencies.append((1000 * (ended - started), 1000 * (ended_cpu - started_cpu)))
    after = server.stat()
    server_cpu = round(1000 * (after[1] - before[1]) / count, 3) if after and before else None
    return np.asarray(latencies), server_cpu


def _measure(
    ctx: Context,
    server: Server,
    run: Any,
    rerank: bool,
    truth: np.ndarray,
    kind: str,
    setting: str,
    extra: dict[str, Any],
) -> None:
    """Recall@10 of `run` over all queries against `truth`, then latency one query at a
    time: a row of the client's own CPU, with the server's as `server_cpu_ms_per_query`."""
    from search import CANDIDATES, K, rescore

    found = _top(run, ctx.corpus, ctx.queries, rerank, CANDIDATES, K, rescore)
    recall = float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, truth, strict=True)]))
    latencies, server_cpu = _time_single(run, ctx, rerank, server)
    extra = {**extra, "server_cpu_ms_per_query": server_cpu}
    ctx.record_row(kind, setting, rerank, recall, latencies, extra, first=False)


def _freshness(client: Any, name: str, ctx: Context) -> dict[str, float]:
    """Seconds from an insert (or delete) returning to a Bounded search seeing it."""
    inserted, deleted = [], []
    for attempt in range(FRESHNESS_TRIES):
        new_id = 10**12 + attempt
        vector = ctx.queries[attempt]
        started = time.perf_counter()
        client.insert(
            name, [{"id": new_id, "upload_id": new_id, "vector": vector.tolist(), "bucket": 0}]
        )
        while True:
            hits = client.search(
                name, data=[vector.tolist()], limit=1, search_params={"params": {"ef": 64}}
            )
            if hits[0] and int(hits[0][0]["id"]) == new_id:
                break
            time.sleep(0.01)
        inserted.append(time.perf_counter() - started)
        started = time.perf_counter()
        client.delete(name, ids=[new_id])
        while True:
            hits = client.search(
                name, data=[vector.tolist()], limit=1, search_params={"params": {"ef": 64}}
            )
            if not hits[0] or int(hits[0][0]["id"]) != new_id:
                break
            time.sleep(0.01)
        deleted.append(time.perf_counter() - started)
    return {
        "insert_p50_s": float(np.median(inserted)),
        "insert_max_s": float(np.max(inserted)),
        "delete_p50_s": float(np.median(deleted)),
        "delete_max_s": float(np.max(deleted)),
    }
