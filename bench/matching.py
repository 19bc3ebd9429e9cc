"""Exact matching at bank scale, against what a user would otherwise pick.

    python bench/matching.py --threads 1                   # CLIP and PDQ, 100k and 1M
    python bench/matching.py --threads 2 --sizes 100000
    python bench/matching.py --section pdq
    python bench/matching.py --load 1000000   # loading a bank from PostgreSQL instead

CLIP: for each bank size and dimension, a bank of random unit vectors, and batches of
unit queries of which half are planted near bank entries (cosine distances 0.01 to
0.0499, and just outside at 0.0501 to 0.06), so that every batch has hits and near
misses. Each way of finding every bank row within the radius (inner product >= 0.95) is
timed, in alternating rounds:

- `faiss`: Faiss's flat range search as Faiss users run it, at its defaults (its SIMD
  scan query by query, below `distance_compute_blas_threshold` queries x dimensions);
- `faiss-blas`: the same with the threshold at 0, so that it always takes its BLAS path
  (blocked sgemm), as a user who sets the threshold gets. (This benchmark used to set it
  to 4, which at Faiss 1.15 forced the BLAS path on one query: a slower Faiss than its
  users run.) Both call `range_search_inner_product` on the bank array itself, which is
  what `IndexFlatIP.range_search` runs over its own copy (`--faiss-index` times that too,
  at the cost of a second copy of the bank);
- `numpy`, `torch`: a float32 GEMM per block of 2^20 scores, then the rows >= threshold;
- `matcher`: `ClipBank.search` as a worker runs it: the method its calibration chose for
  this batch and bank size (`moderation.banks.clip_calibration`, cached per machine as a
  worker caches it), candidates within a proven margin, then the exact check.

Every method must find exactly the same (query, bank row) pairs, or the run fails.

PDQ: a bank of random 256-bit hashes, with near copies of the queries at every distance
from 0 to 40 bits; queries one per call and 1,000 in one call, threshold 31:

- `pdqindex`: ThreatExchange's `PDQIndex` (`pip install moderation[bench]`), which HMA
  uses: Faiss's `IndexBinaryMultiHash` (16 substrings of 16 bits) behind an id map, hex
  strings in; the batch through its inner index's `search_with_distance_in_result`;
- `faiss-brute`: Faiss's `hamming_range_search` over the array, what the matcher ran;
- `matcher`: `moderation.banks.pdq_search` (multi-index hashing of its own) over the
  worker's PDQ store, rows mapped to entry ids.

Threads: `--threads` (default 1) for Faiss's OpenMP, OpenBLAS and torch; run once per
count (OpenBLAS reads it at start). Times are per query (the batch's time divided by its
size): the fastest of the rounds, and the median. Written to bench/results/matching.json
(or `--out`), with the machine and its load average.

`--load N`: a bank of N random 768-d entries (with PDQ hashes) in PostgreSQL
(MODERATION_BENCH_DATABASE_URL, default database moderation_bench_matching), added by
`copy_entries` unless already there; then, in a fresh process, the time and peak RSS of
building the worker's snapshot (`BankMatcher`), and the time a running matcher takes to
bring its snapshot up to date (median of `--repeats`, each change committed by another
session, each checked to match or not as it should):

- a check that finds nothing changed (the change log's index range scan), and the
  queries the matcher ran for that check before the change log, in the same run;
- after adding 1 entry (SHA-256, PDQ and embedding), removing 1 entry, changing a small
  bank's radius, and disabling then enabling that bank;
- a full load of the same banks (`load_index`), what every change cost before.

The bank returns to N entries. Written to bench/results/matching_load.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moderation.config import Settings
    from moderation.runtime import Runtime

SIZES = [100_000, 1_000_000]
DIMS = [768]
BATCHES = [1, 8, 64]
RADIUS = 0.05
THRESHOLD = 1.0 - RADIUS
PDQ_THRESHOLD = 31
PDQ_BATCH = 1000
# Rounds of every method in turn; a method is timed at least this many times, and for at
# least MIN_TIMED_S in all.
ROUNDS = 4
MIN_TIMED_S = 0.3
# Scores per block for the plain NumPy and torch products: as the matcher has it on CPU.
BLOCK_SCORES = 1 << 20
BENCH_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation_bench_matching"

Pairs = set[tuple[int, int]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--section", choices=["clip", "pdq", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="Bank sizes.")
    parser.add_argument("--dims", type=int, nargs="+", default=DIMS, help="CLIP dimensions.")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES, help="CLIP batches.")
    parser.add_argument("--threads", type=int, default=1, help="Threads for every method.")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--faiss-index", action="store_true", help="Time IndexFlatIP too.")
    parser.add_argument("--repeats", type=int, default=3, help="--load: refreshes timed.")
    parser.add_argument("--load", type=int, metavar="N", help="Measure loading N entries instead.")
    parser.add_argument("--load-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="--load: where the matcher scores.")
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault(
        "MODERATION_DATABASE_URL", os.environ.get("MODERATION_BENCH_DATABASE_URL", BENCH_DATABASE)
    )
    # Neither imports NumPy, whose thread count `measure_search` sets first.
    from moderation.config import Settings
    from moderation.runtime import Runtime

    # Settings from the environment, which the --load-child process inherits too.
    runtime = Runtime(Settings())
    try:
        if args.load_child:
            load_child(runtime, args.device, args.repeats)
        elif args.load:
            out = args.out or Path("bench/results/matching_load.json")
            measure_load(runtime, args.load, out, args.device, args.repeats)
        else:
            measure_search(runtime.settings, args)
    finally:
        runtime.close()


def measure_search(settings: Settings, args: argparse.Namespace) -> None:
    # OpenBLAS reads its thread count once, when NumPy is first imported.
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import faiss
    import numpy as np
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "faiss_blas_threshold_default": faiss.cvar.distance_compute_blas_threshold,
        "processor": _cpu_model(),
        "machine": platform.platform(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_before": os.getloadavg(),
    }
    if args.section in ("clip", "both"):
        results["clip"] = measure_clip(settings, args)
    if args.section in ("pdq", "both"):
        results["pdq"] = measure_pdq(args)
    results["load_average_after"] = os.getloadavg()
    write(results, args.out or Path("bench/results/matching.json"))


def measure_clip(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import torch

    from moderation.banks.clip_calibration import calibrated_plan

    rows: list[dict[str, Any]] = []
    plans = {}
    for dim in args.dims:
        started = time.perf_counter()
        plan = calibrated_plan(dim, "cpu", settings.resolved_clip_plan_cache())
        plans[dim] = {"choices": plan.as_json()["choices"], "s": time.perf_counter() - started}
        print(f"{dim}-d plan: {plans[dim]}", flush=True)
        for size in args.sizes:
            bank = random_bank(size, dim, seed=size + dim)
            snapshot = clip_bank(bank, plan)
            index = None
            if args.faiss_index:
                index = faiss.IndexFlatIP(dim)
                index.add(bank)
            for batch in args.batches:
                queries = planted_queries(bank, batch, seed=batch)
                methods: dict[str, Callable[[], Pairs]] = {
                    "faiss": partial(faiss_pairs, bank, queries, blas=False),
                    "faiss-blas": partial(faiss_pairs, bank, queries, blas=True),
                    "numpy": partial(numpy_pairs, bank, queries),
                    "torch": partial(torch_pairs, torch.from_numpy(bank), queries),
                    "matcher": partial(matcher_pairs, snapshot, queries),
                }
                if index is not None:
                    methods["faiss-index"] = partial(faiss_index_pairs, index, queries)
                timed = time_alternating(methods, args.rounds)
                found = {name: pairs for name, (_, _, pairs) in timed.items()}
                row = {
                    "dim": dim,
                    "bank": size,
                    "batch": batch,
                    "hits": len(found["faiss"]),
                    "matcher_method": snapshot.method_for(batch).name,
                    "ms_per_query": {
                        n: round(1000 * b / batch, 3) for n, (b, _, _) in timed.items()
                    },
                    "median_ms_per_query": {
                        n: round(1000 * m / batch, 3) for n, (_, m, _) in timed.items()
                    },
                }
                peers = {n: t for n, t in row["ms_per_query"].items() if n != "matcher"}
                best_peer = min(peers, key=peers.__getitem__)
                row["best_peer"] = best_peer
                row["matcher_over_best_peer"] = round(
                    row["ms_per_query"]["matcher"] / peers[best_peer], 3
                )
                disagree = [name for name, pairs in found.items() if pairs != found["faiss"]]
                if disagree:
                    raise SystemExit(f"{disagree} found other pairs than faiss: {row}")
                rows.append(row)
                print_clip_row(row, first=len(rows) == 1)
            del index, snapshot, bank
            gc.collect()
    return {"radius": RADIUS, "plans": plans, "rows": rows}


def write(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")


def random_bank(size: int, dim: int, seed: int) -> Any:
    """Unit vectors, generated and normalised a block at a time to keep one copy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bank = np.empty((size, dim), np.float32)
    for start in range(0, size, 65_536):
        block = bank[start : start + 65_536]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return bank


def planted_queries(bank: Any, count: int, seed: int) -> Any:
    """Unit queries; every other one near a bank row, at a distance in or just out."""
    import numpy as np

    # The tests' helper that places vectors at exact distances; bench/ runs from the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.vectors import at_cosine_distance

    rng = np.random.default_rng(seed)
    distances = (0.01, 0.03, 0.045, 0.0499, 0.0501, 0.06)
    queries = rng.standard_normal((count, bank.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for i in range(0, count, 2):
        anchor = bank[rng.integers(len(bank))]
        queries[i] = at_cosine_distance(anchor, distances[(i // 2) % len(distances)], seed=i)
    return queries


def time_alternating(
    methods: dict[str, Callable[[], Any]], rounds: int
) -> dict[str, tuple[float, float, Any]]:
    """(fastest, median, result) of each method, timed in turn within each round, so that
    a busy moment on a shared machine slows them all rather than one."""
    results = {name: method() for name, method in methods.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    done = 0
    while done < rounds or min(sum(t) for t in times.values()) < MIN_TIMED_S:
        for name, method in methods.items():
            started = time.perf_counter()
            method()
            times[name].append(time.perf_counter() - started)
        done += 1
    return {
        name: (min(times[name]), statistics.median(times[name]), results[name]) for name in methods
    }


def faiss_pairs(bank: Any, queries: Any, *, blas: bool) -> Pairs:
    """What `IndexFlatIP.range_search` runs, over the bank array itself."""
    import faiss
    import numpy as np

    default = faiss.cvar.distance_compute_blas_threshold
    if blas:
        faiss.cvar.distance_compute_blas_threshold = 0
    try:
        result = faiss.RangeSearchResult(len(queries))
        faiss.range_search_inner_product(
            faiss.swig_ptr(queries),
            faiss.swig_ptr(bank),
            bank.shape[1],
            len(queries),
            len(bank),
            THRESHOLD,
            result,
        )
    finally:
        faiss.cvar.distance_compute_blas_threshold = default
    limits = faiss.rev_swig_ptr(result.lims, len(queries) + 1).astype(np.int64)
    rows = faiss.rev_swig_ptr(result.labels, int(limits[-1])).tolist()
    return {
        (query, row)
        for query in range(len(queries))
        for row in rows[limits[query] : limits[query + 1]]
    }


def faiss_index_pairs(index: Any, queries: Any) -> Pairs:
    limits, _, rows = index.range_search(queries, THRESHOLD)
    return {
        (query, int(row))
        for query in range(len(queries))
        for row in rows[limits[query] : limits[query + 1]]
    }


def numpy_pairs(bank: Any, queries: Any) -> Pairs:
    import numpy as np

    block = max(1, BLOCK_SCORES // len(queries))
    pairs: Pairs = set()
    for start in range(0, len(bank), block):
        scores = queries @ bank[start : start + block].T
        hit_queries, hit_rows = np.nonzero(scores >= THRESHOLD)
        pairs.update(zip(hit_queries.tolist(), (hit_rows + start).tolist(), strict=True))
    return pairs


def torch_pairs(bank: Any, queries: Any) -> Pairs:
    import torch

    block = max(1, BLOCK_SCORES // len(queries))
    pairs: Pairs = set()
    with torch.inference_mode():
        on_cpu = torch.from_numpy(queries)
        for start in range(0, len(bank), block):
            scores = torch.matmul(on_cpu, bank[start : start + block].T)
            hit_queries, hit_rows = torch.nonzero(scores >= THRESHOLD, as_tuple=True)
            pairs.update(zip(hit_queries.tolist(), (hit_rows + start).tolist(), strict=True))
    return pairs


def clip_bank(bank: Any, plan: Any) -> Any:
    """The matcher's `ClipBank` over the bank (entry ids = row numbers), with the copies
    its plan reads."""
    import numpy as np

    from moderation.banks.clip_search import ClipRows

    rows = np.arange(len(bank), dtype=np.int64)
    stored = ClipRows.holding(rows, np.zeros(len(bank), np.int64), bank, plan=plan)
    return stored.bank({0: RADIUS})


def matcher_pairs(snapshot: Any, queries: Any) -> Pairs:
    return {
        (query, hit.bank_entry_id)
        for query, hits in enumerate(snapshot.search(queries))
        for hit in hits
    }


def print_clip_row(row: dict[str, Any], first: bool) -> None:
    times = row["ms_per_query"]
    if first:
        names = "  ".join(f"{name:>11}" for name in times)
        print(f"{'dim':>4} {'bank':>9} {'batch':>5} {'hits':>5}  {names}   (ms per query)")
    print(
        f"{row['dim']:>4} {row['bank']:>9} {row['batch']:>5} {row['hits']:>5}  "
        + "  ".join(f"{ms:>11.3f}" for ms in times.values())
        + f"   matcher: {row['matcher_method']}, "
        + f"{row['matcher_over_best_peer']} x {row['best_peer']}",
        flush=True,
    )


def measure_pdq(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    rows = []
    for size in args.sizes:
        rng = np.random.default_rng(size)
        queries = rng.integers(0, 256, (PDQ_BATCH, 32), dtype=np.uint8)
        hashes = rng.integers(0, 256, (size, 32), dtype=np.uint8)
        # Near copies of the first queries at every distance from 0 to 40 bits.
        for distance in range(41):
            flipped = np.unpackbits(queries[distance]).copy()
            flipped[rng.choice(256, distance, replace=False)] ^= 1
            hashes[rng.integers(size)] = np.packbits(flipped)
        built = pdq_contenders(hashes)
        for batch in (1, PDQ_BATCH):
            runner = run_batched if batch > 1 else run_one_by_one
            methods: dict[str, Callable[[], Any]] = {
                name: partial(runner, search, queries) for name, search in built["search"].items()
            }
            timed = time_alternating(methods, args.rounds)
            found = {name: pairs for name, (_, _, pairs) in timed.items()}
            disagree = [name for name, pairs in found.items() if pairs != found["faiss-brute"]]
            if disagree:
                raise SystemExit(f"PDQ: {disagree} found other pairs than faiss-brute")
            row = {
                "bank": size,
                "queries_per_call": batch,
                "pairs": len(found["faiss-brute"]),
                "ms_per_query": {
                    n: round(1000 * b / PDQ_BATCH, 4) for n, (b, _, _) in timed.items()
                },
                "median_ms_per_query": {
                    n: round(1000 * m / PDQ_BATCH, 4) for n, (_, m, _) in timed.items()
                },
                "build_s": built["build_s"],
            }
            times = row["ms_per_query"]
            row["matcher_over_pdqindex"] = round(times["matcher"] / times["pdqindex"], 3)
            rows.append(row)
            print(f"PDQ {row}", flush=True)
        del built
        gc.collect()
    return {"threshold": PDQ_THRESHOLD, "rows": rows}


def pdq_contenders(hashes: Any) -> dict[str, Any]:
    """Each contender built over the same hashes: a search function taking (queries) and
    returning {(query, entry)}, and the time each took to build."""
    import faiss
    import numpy as np
    from threatexchange.signal_type.pdq.pdq_index import PDQIndex

    from moderation.banks.pdq_search import PdqRows

    entry_ids = np.arange(len(hashes), dtype=np.int64) + 1_000_000_000
    build_s = {}
    hex_rows = [bytes(row).hex() for row in hashes]
    started = time.perf_counter()
    pdq_index = PDQIndex(list(zip(hex_rows, entry_ids.tolist(), strict=True)))
    build_s["pdqindex"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    store = PdqRows()
    store.append(entry_ids, np.zeros(len(hashes), np.int64), hashes)
    store.seal()
    snapshot = store.snapshot()
    build_s["matcher"] = round(time.perf_counter() - started, 2)

    def pdqindex(queries: Any) -> set[tuple[int, int]]:
        if len(queries) == 1:
            return {(0, match.metadata) for match in pdq_index.query(bytes(queries[0]).hex())}
        strings = [bytes(q).hex() for q in queries]
        found = pdq_index.index.search_with_distance_in_result(strings, PDQ_THRESHOLD)
        return {
            (i, pdq_index.local_id_to_entry[local][1])
            for i, string in enumerate(strings)
            for local, _, _ in found[string]
        }

    def faiss_brute(queries: Any) -> set[tuple[int, int]]:
        faiss.omp_set_num_threads(1 if len(queries) == 1 else faiss.omp_get_max_threads())
        result = faiss.RangeSearchResult(len(queries))
        faiss.hamming_range_search(  # type: ignore[attr-defined]
            faiss.swig_ptr(queries),
            faiss.swig_ptr(hashes),
            len(queries),
            len(hashes),
            PDQ_THRESHOLD + 1,
            32,
            result,
        )
        limits = faiss.rev_swig_ptr(result.lims, len(queries) + 1).astype(np.int64)
        rows = faiss.rev_swig_ptr(result.labels, int(limits[-1])).astype(np.int64)
        owners = np.repeat(np.arange(len(queries)), np.diff(limits))
        return set(zip(owners.tolist(), entry_ids[rows].tolist(), strict=True))

    def matcher(queries: Any) -> set[tuple[int, int]]:
        query_rows, rows, _ = snapshot.search(queries, PDQ_THRESHOLD)
        return set(zip(query_rows.tolist(), snapshot.rows.entry_ids[rows].tolist(), strict=True))

    return {
        "search": {"pdqindex": pdqindex, "faiss-brute": faiss_brute, "matcher": matcher},
        "build_s": build_s,
    }


def run_one_by_one(
    search: Callable[[Any], set[tuple[int, int]]], queries: Any
) -> set[tuple[int, int]]:
    found: set[tuple[int, int]] = set()
    for i in range(len(queries)):
        found.update((i, entry) for _, entry in search(queries[i : i + 1]))
    return found


def run_batched(
    search: Callable[[Any], set[tuple[int, int]]], queries: Any
) -> set[tuple[int, int]]:
    return search(queries)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


LOAD_DIM = 768
LOAD_MODEL = "bench-matching-random-768"


def measure_load(runtime: Runtime, size: int, out: Path, device: str, repeats: int) -> None:
    """Fill the bench database's bank to `size` entries, then measure loading it in a
    fresh process (so that its peak RSS is the load's, not this process's)."""
    import numpy as np
    from sqlalchemy import func, select, update

    from moderation import schema
    from moderation.banks import service as banks
    from moderation.banks.models import Bank, BankEntry
    from moderation.embedding.service import get_or_create_model

    schema.upgrade(runtime.settings.database_url)
    inserted_s = None
    with runtime.session() as session:
        model = get_or_create_model(session, LOAD_MODEL, LOAD_DIM)
        # One bank holds what is measured: other banks of this database are disabled.
        session.execute(
            update(Bank).values(enabled=Bank.name.in_(["bench-load", "bench-load-small"]))
        )
        bank = session.scalar(select(Bank).where(Bank.name == "bench-load"))
        if bank is None:
            bank = banks.create_bank(session, "bench-load")
        present = session.scalar(
            select(func.count(BankEntry.id)).where(BankEntry.bank_id == bank.id)
        )
        missing = size - (present or 0)
        if missing < 0:
            raise SystemExit(f"the bench bank holds {present} entries, more than {size}")
        if session.scalar(select(Bank).where(Bank.name == "bench-load-small")) is None:
            # A small bank whose radius and state the refresh timings change.
            small = banks.create_bank(session, "bench-load-small")
            vectors = _unit_rows(np.random.default_rng(1), 100)
            banks.copy_entries(session, small, model=model, vectors=vectors, added_by="bench")
        rng = np.random.default_rng(present)
        started = time.perf_counter()
        for start in range(0, missing, 100_000):
            count = min(100_000, missing - start)
            vectors = rng.standard_normal((count, LOAD_DIM), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            pdq = rng.integers(0, 256, (count, 32), dtype=np.uint8)
            banks.copy_entries(
                session, bank, model=model, vectors=vectors, pdq=pdq, added_by="bench"
            )
            print(f"inserted {start + count} of {missing}", flush=True)
        if missing:
            inserted_s = time.perf_counter() - started
    child = subprocess.run(
        [sys.executable, __file__, "--load-child", "--device", device, "--repeats", str(repeats)],
        check=True,
        capture_output=True,
        text=True,
    )
    results = {
        "entries": size,
        "dim": LOAD_DIM,
        "inserted_s": None if inserted_s is None else round(inserted_s, 1),
        **json.loads(child.stdout.splitlines()[-1]),
        "machine": platform.platform(),
        "load_average": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(results, indent=2))
    write(results, out)


def load_child(runtime: Runtime, device: str, repeats: int) -> None:
    """In a fresh process: build the snapshot as a worker does, then time its refreshes."""
    from moderation.banks.matcher import BankMatcher, MatchSettings
    from moderation.embedding.service import get_or_create_model

    with runtime.session() as session:
        model_id = get_or_create_model(session, LOAD_MODEL, LOAD_DIM).id
    settings = MatchSettings(RADIUS, 31, 50)
    before = _rss_mb()
    started = time.perf_counter()
    matcher = BankMatcher(
        runtime.session,
        model_id=model_id,
        dim=LOAD_DIM,
        settings=settings,
        refresh_s=0.0,
        device=device,
    )
    loaded_s = time.perf_counter() - started
    peak = _rss_mb("VmHWM")
    index = matcher.current()  # refresh_s 0: checks the change log, finds nothing new
    started = time.perf_counter()
    kept = matcher.current() is index
    check_s = time.perf_counter() - started
    refreshes = _time_refreshes(runtime, matcher, model_id, settings, device, repeats)
    print(
        json.dumps(
            {
                "device": device,
                "load_s": round(loaded_s, 1),
                "rss_before_mb": round(before),
                "peak_rss_mb": round(peak),
                "rss_after_mb": round(_rss_mb()),
                "bank_vectors_mb": round(index.clip.vectors.nbytes / 2**20),
                "unchanged_refresh_s": round(check_s, 4),
                "unchanged_refresh_kept_snapshot": kept,
                **refreshes,
                "sizes": matcher.current().size,
            }
        )
    )


def _time_refreshes(
    runtime: Runtime, matcher: Any, model_id: int, settings: Any, device: str, repeats: int
) -> dict[str, Any]:
    """Each kind of change committed by another session, then the time of the next
    `matcher.current()`; the medians of `repeats`, in ms, beside a full load's."""
    import statistics

    import numpy as np
    from sqlalchemy import delete, select

    from moderation.banks import service as banks
    from moderation.banks.matcher import load_index
    from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
    from moderation.embedding.service import vector_to_bytes
    from moderation.images.hashing import PdqHash
    from moderation.images.signals import FrameSignals, ImageSignals

    rng = np.random.default_rng(11)
    times: dict[str, list[float]] = {}

    def timed(kind: str) -> Any:
        started = time.perf_counter()
        index = matcher.current()
        times.setdefault(kind, []).append(1000 * (time.perf_counter() - started))
        return index

    def signals(sha: bytes, pdq: bytes) -> ImageSignals:
        frame = FrameSignals(index=0, pdq=PdqHash(pdq, 100), pixels=np.zeros(1))
        return ImageSignals(sha, "PNG", 10, 10, 1, [frame])

    def matched(index: Any, sha: bytes, pdq: bytes, vector: Any) -> set[tuple[int, str]]:
        found = index.match(signals(sha, pdq), vector[np.newaxis])
        return {(m.bank_entry_id, m.signal.value) for m in found}

    with runtime.session() as session:
        small_id = session.scalars(select(Bank.id).where(Bank.name == "bench-load-small")).one()
        bank_id = session.scalars(select(Bank.id).where(Bank.name == "bench-load")).one()
    for _ in range(repeats):
        timed("unchanged_check_ms")
        _time_old_checkpoint(runtime, times, model_id)
        vector = _unit_rows(rng, 1)[0]
        sha, pdq = rng.bytes(32), rng.bytes(32)
        with runtime.session() as session:
            entry = BankEntry(bank_id=bank_id, sha256=sha, pdq=pdq, added_by="bench")
            session.add(entry)
            session.flush()
            entry_id = entry.id
            session.add(
                BankEntryEmbedding(
                    bank_entry_id=entry_id, model_id=model_id, vector=vector_to_bytes(vector)
                )
            )
        index = timed("add_1_entry_ms")
        assert matched(index, sha, pdq, vector) == {
            (entry_id, "sha256"),
            (entry_id, "pdq"),
            (entry_id, "clip"),
        }, "the entry just added is not matched"
        with runtime.session() as session:
            session.execute(delete(BankEntry).where(BankEntry.id == entry_id))
        index = timed("remove_1_entry_ms")
        assert matched(index, sha, pdq, vector) == set(), "the entry just removed is matched"
        with runtime.session() as session:
            bank = session.get_one(Bank, small_id)
            banks.update_bank(session, bank, actor="bench", radius=0.04 if bank.radius else 0.06)
        timed("radius_change_ms")
        for enabled in (False, True):
            with runtime.session() as session:
                banks.update_bank(
                    session, session.get_one(Bank, small_id), actor="bench", enabled=enabled
                )
            timed("disable_100_ms" if not enabled else "enable_100_ms")
    with runtime.session() as session:
        started = time.perf_counter()
        load_index(session, model_id, LOAD_DIM, settings, device)
        full_load_s = time.perf_counter() - started
    medians = {kind: round(statistics.median(ms), 2) for kind, ms in times.items()}
    return {"refresh_ms": medians, "full_load_s": round(full_load_s, 1), "repeats": repeats}


def _time_old_checkpoint(runtime: Runtime, times: dict[str, list[float]], model_id: int) -> None:
    """The queries a check ran before the change log: counts and maxima over the bank
    tables (the baseline of `unchanged_check_ms`)."""
    from sqlalchemy import func, select

    from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding

    with runtime.session() as session:
        started = time.perf_counter()
        session.execute(select(func.count(Bank.id), func.max(Bank.updated_at))).one()
        session.execute(
            select(func.count(BankEntry.id), func.max(BankEntry.id), func.max(BankEntry.updated_at))
        ).one()
        session.execute(
            select(func.count(BankEntryEmbedding.id), func.max(BankEntryEmbedding.id)).where(
                BankEntryEmbedding.model_id == model_id
            )
        ).one()
        times.setdefault("old_checkpoint_queries_ms", []).append(
            1000 * (time.perf_counter() - started)
        )


def _unit_rows(rng: Any, count: int) -> Any:
    import numpy as np

    rows = rng.standard_normal((count, LOAD_DIM), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


if __name__ == "__main__":
    main()
