"""Exact CLIP matching at bank scale: which way of scoring a bank is fastest, per query.

    python bench/matching.py            # quick: 768-d, every bank size, batches 1 and 64
    python bench/matching.py --full     # 512 and 768-d, batches 1, 8 and 64
    python bench/matching.py --threads 2
    python bench/matching.py --load 1000000   # loading a bank from PostgreSQL instead

For each bank size and dimension, a bank of random unit vectors, and batches of unit
queries of which half are planted near bank entries (cosine distances 0.01 to 0.0499,
and just outside at 0.0501 to 0.06), so every batch has hits and near misses. Each way
of finding every bank row within the radius (inner product >= 1 - radius) is timed:

- `faiss`: `IndexFlatIP.range_search`, as the matcher did (its BLAS threshold included);
- `numpy`: a float32 GEMM per block of bank rows, then `np.nonzero(scores >= threshold)`;
- `torch`: the same with `torch.matmul` (CPU, or the GPU where there is one);
- `matcher`: `BankIndex.search_clip` as the worker runs it (candidates, then the exact check);
- `torch-fp16` (CUDA only): a GPU-resident fp16 bank, candidates by a margin, then the
  exact check, as the matcher does on CUDA.

Every method must find exactly the same (query, bank row) pairs, or the run fails.
Threads as in the worker: `--threads` (default: the worker's torch threads per inference
stream, `Settings.resolved_torch_threads()`) for Faiss's OpenMP, OpenBLAS and torch.
Times are per query (the batch's time divided by its size), the best of the repeats.
Printed as a table and written to bench/results/matching.json.

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
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

QUICK = {"sizes": [10_000, 100_000, 1_000_000], "dims": [768], "batches": [1, 64]}
FULL = {"sizes": [10_000, 100_000, 1_000_000], "dims": [512, 768], "batches": [1, 8, 64]}
RADIUS = 0.05
# A method is timed for at least this long (and at least `--repeats` times).
MIN_TIMED_S = 0.3
# Faiss's BLAS threshold as the matcher set it when it searched with Faiss.
FAISS_BLAS_FROM = 4
BENCH_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation_bench_matching"

Pairs = set[tuple[int, int]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="Both dims and batch 8 too.")
    parser.add_argument("--sizes", type=int, nargs="+", help="Bank sizes (overrides the preset).")
    parser.add_argument("--dims", type=int, nargs="+", help="Dimensions (overrides the preset).")
    parser.add_argument("--batches", type=int, nargs="+", help="Queries per call (overrides).")
    parser.add_argument("--threads", type=int, help="Threads for every method (default: worker).")
    parser.add_argument("--repeats", type=int, default=3)
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
    if args.load_child:
        load_child(args.device, args.repeats)
    elif args.load:
        out = args.out or Path("bench/results/matching_load.json")
        measure_load(args.load, out, args.device, args.repeats)
    else:
        measure_search(args)


def measure_search(args: argparse.Namespace) -> None:
    from moderation.config import Settings

    threads = args.threads or Settings().resolved_torch_threads()
    # OpenBLAS reads its thread count once, when NumPy is first imported.
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    import faiss
    import numpy as np
    import torch

    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_FROM
    torch.set_num_threads(threads)
    preset = FULL if args.full else QUICK
    cuda = torch.cuda.is_available()

    rows: list[dict[str, Any]] = []
    for dim in args.dims or preset["dims"]:
        for size in args.sizes or preset["sizes"]:
            bank = random_bank(size, dim, seed=size + dim)
            index = faiss.IndexFlatIP(dim)
            index.add(bank)
            snapshots = {"matcher": clip_bank(bank, "cpu")}
            if cuda:
                snapshots["torch-fp16"] = clip_bank(bank, "cuda")
            for batch in args.batches or preset["batches"]:
                queries = planted_queries(bank, batch, seed=batch)
                methods: dict[str, Callable[[], Pairs]] = {
                    "faiss": partial(faiss_pairs, index, queries),
                    "numpy": partial(numpy_pairs, bank, queries),
                    "torch": partial(torch_pairs, torch.from_numpy(bank), queries),
                }
                for name, snapshot in snapshots.items():
                    methods[name] = partial(matcher_pairs, snapshot, queries)
                times: dict[str, float] = {}
                found: dict[str, Pairs] = {}
                for name, method in methods.items():
                    seconds, found[name] = best_time(method, args.repeats)
                    times[name] = round(1000 * seconds / batch, 3)
                row = {"dim": dim, "bank": size, "batch": batch, "hits": len(found["faiss"])}
                row["ms_per_query"] = times
                disagree = [name for name, pairs in found.items() if pairs != found["faiss"]]
                if disagree:
                    raise SystemExit(f"{disagree} found other pairs than faiss: {row}")
                rows.append(row)
                print_row(row, first=len(rows) == 1)
            del index, snapshots, bank

    results = {
        "rows": rows,
        "radius": RADIUS,
        "threads": threads,
        "faiss_blas_from": FAISS_BLAS_FROM,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "machine": platform.platform(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write(results, args.out or Path("bench/results/matching.json"))
    print(f"threads {threads}")


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


def best_time(method: Callable[[], Pairs], repeats: int) -> tuple[float, Pairs]:
    pairs = method()  # warm-up: first-touch of buffers, thread pools
    times: list[float] = []
    while len(times) < repeats or sum(times) < MIN_TIMED_S:
        started = time.perf_counter()
        method()
        times.append(time.perf_counter() - started)
    return min(times), pairs


THRESHOLD = 1.0 - RADIUS
# Scores per block for the plain NumPy and torch products: as the matcher has it on CPU.
BLOCK_SCORES = 1 << 20


def faiss_pairs(index: Any, queries: Any) -> Pairs:
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


def clip_bank(bank: Any, device: str) -> Any:
    """The matcher's `ClipBank` over the bank, entry ids = row numbers."""
    import numpy as np

    from moderation.banks.clip_search import ClipRows

    rows = np.arange(len(bank), dtype=np.int64)
    stored = ClipRows.holding(rows, np.zeros(len(bank), np.int64), bank, device=device)
    return stored.bank({0: RADIUS})


def matcher_pairs(snapshot: Any, queries: Any) -> Pairs:
    return {
        (query, hit.bank_entry_id)
        for query, hits in enumerate(snapshot.search(queries))
        for hit in hits
    }


def print_row(row: dict[str, Any], first: bool) -> None:
    times = row["ms_per_query"]
    if first:
        names = "  ".join(f"{name:>10}" for name in times)
        print(f"{'dim':>4} {'bank':>9} {'batch':>5} {'hits':>5}  {names}   (ms per query)")
    print(
        f"{row['dim']:>4} {row['bank']:>9} {row['batch']:>5} {row['hits']:>5}  "
        + "  ".join(f"{ms:>10.3f}" for ms in times.values()),
        flush=True,
    )


LOAD_DIM = 768
LOAD_MODEL = "bench-matching-random-768"


def measure_load(size: int, out: Path, device: str, repeats: int) -> None:
    """Fill the bench database's bank to `size` entries, then measure loading it in a
    fresh process (so that its peak RSS is the load's, not this process's)."""
    import numpy as np
    from sqlalchemy import func, select, update

    from moderation import schema
    from moderation.banks import service as banks
    from moderation.banks.models import Bank, BankEntry
    from moderation.db import session_scope
    from moderation.embedding.service import get_or_create_model

    schema.upgrade()
    inserted_s = None
    with session_scope() as session:
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


def load_child(device: str, repeats: int) -> None:
    """In a fresh process: build the snapshot as a worker does, then time its refreshes."""
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session

    from moderation.banks.matcher import BankMatcher, MatchSettings
    from moderation.db import session_scope
    from moderation.embedding.service import get_or_create_model

    def sessions() -> AbstractContextManager[Session]:
        return session_scope()

    with session_scope() as session:
        model_id = get_or_create_model(session, LOAD_MODEL, LOAD_DIM).id
    settings = MatchSettings(RADIUS, 31, 50)
    before = _rss_mb()
    started = time.perf_counter()
    matcher = BankMatcher(
        sessions,
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
    refreshes = _time_refreshes(matcher, model_id, settings, device, repeats)
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
    matcher: Any, model_id: int, settings: Any, device: str, repeats: int
) -> dict[str, Any]:
    """Each kind of change committed by another session, then the time of the next
    `matcher.current()`; the medians of `repeats`, in ms, beside a full load's."""
    import statistics

    import numpy as np
    from sqlalchemy import delete, select

    from moderation.banks import service as banks
    from moderation.banks.matcher import load_index
    from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
    from moderation.db import session_scope
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

    with session_scope() as session:
        small_id = session.scalars(select(Bank.id).where(Bank.name == "bench-load-small")).one()
        bank_id = session.scalars(select(Bank.id).where(Bank.name == "bench-load")).one()
    for _ in range(repeats):
        timed("unchanged_check_ms")
        _time_old_checkpoint(times, model_id)
        vector = _unit_rows(rng, 1)[0]
        sha, pdq = rng.bytes(32), rng.bytes(32)
        with session_scope() as session:
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
        with session_scope() as session:
            session.execute(delete(BankEntry).where(BankEntry.id == entry_id))
        index = timed("remove_1_entry_ms")
        assert matched(index, sha, pdq, vector) == set(), "the entry just removed is matched"
        with session_scope() as session:
            bank = session.get_one(Bank, small_id)
            banks.update_bank(session, bank, actor="bench", radius=0.04 if bank.radius else 0.06)
        timed("radius_change_ms")
        for enabled in (False, True):
            with session_scope() as session:
                banks.update_bank(
                    session, session.get_one(Bank, small_id), actor="bench", enabled=enabled
                )
            timed("disable_100_ms" if not enabled else "enable_100_ms")
    with session_scope() as session:
        started = time.perf_counter()
        load_index(session, model_id, LOAD_DIM, settings, device)
        full_load_s = time.perf_counter() - started
    medians = {kind: round(statistics.median(ms), 2) for kind, ms in times.items()}
    return {"refresh_ms": medians, "full_load_s": round(full_load_s, 1), "repeats": repeats}


def _time_old_checkpoint(times: dict[str, list[float]], model_id: int) -> None:
    """The queries a check ran before the change log: counts and maxima over the bank
    tables (the baseline of `unchanged_check_ms`)."""
    from sqlalchemy import func, select

    from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
    from moderation.db import session_scope

    with session_scope() as session:
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
