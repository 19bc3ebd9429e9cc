"""Measuring which CLIP candidate method (`clip_methods`) is fastest on this machine.

The fastest exact method depends on the device, the batch and the bank: measured on a
2-core AMD EPYC (Zen 4, AVX512-BF16), one thread, 200,000 x 768, ms per query at batches
of 1 / 8 / 64: Faiss's scan 20 / 21 / 22 (it scans query by query below its BLAS
threshold), NumPy 43 / 17 / 5.0, torch float32 46 / 12 / 5.1, torch float16 16 / 16 / 15
(a fast GEMV, no fast GEMM), torch bfloat16 37 / 5.7 / 2.1 (oneDNN's AVX512-BF16 GEMM, a
slow GEMV). No one method wins everywhere, and another CPU orders them otherwise, so a
worker measures them (`calibrate`): each available method on random unit vectors of the
bank's dimension, at batches of 1, 8 and 64 and at two bank sizes (one that fits the
caches, one that does not), with the thread settings the search will run with. The
table is cached in a file per machine, keyed by everything the timings depend on, so
only a worker's first start on a machine pays for it (about 10 s at 768-d on two cores).
A measurement taken while the machine was busy (load average above its cores) is used
but not cached: on a 2-core machine running several other jobs it chose NumPy over the
bfloat16 product for batches, at half the speed measured when quiet.

A search then takes, for its batch and its bank's size, the method measured fastest at
the nearest batch (in ratio) of the size class. Every method returns the same hits (the
exact check decides), so a stale or noisy table costs time, never a hit. Methods that
read a half-precision copy cost memory: the bank holds one such copy per half type that
its plan uses (2 bytes a value, 1.5 GB for a million 768-d rows, beside the float32 rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import faiss
import numpy as np
import torch

from moderation.banks import clip_methods
from moderation.banks.clip_methods import Method
from moderation.banks.clip_plan import CALIBRATED_BATCHES, ClipPlan
from moderation.banks.clip_search import ClipRows, candidate_margin, rounding_of
from moderation.errors import Invalid

logger = logging.getLogger(__name__)


class InvalidMatchMethods(Invalid):
    """`MODERATION_CLIP_MATCH_METHODS` names a method that does not exist or cannot run
    here, or none of those named can run exactly here."""

    code = "invalid_match_methods"


# Bank sizes measured: one within the caches of most CPUs, one well beyond them (192 MB
# at 768-d), where a scan streams from memory as a bank of a million does.
SMALL_ROWS = 4096
LARGE_ROWS = 65536
# Each method is timed `ROUNDS` times per case (the fastest kept), the methods alternating
# within a round so that a busy moment slows them all rather than one; a method more than
# `DROP_FACTOR` times slower than the best after a round is not timed again in that case.
ROUNDS = 3
DROP_FACTOR = 3.0
# Part of the cache key: a change to what is measured or how measures anew.
PLAN_VERSION = 1


def machine_key(dim: int, device: str, methods: Sequence[Method]) -> str:
    """What a calibration's timings depend on: the processor, the device, the libraries,
    the threads each may use, the dimension and the methods measured."""
    parts = {
        "version": PLAN_VERSION,
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "torch_threads": torch.get_num_threads(),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", ""),
        "dim": dim,
        "methods": sorted(method.name for method in methods),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def plan_for(dim: int, device: str, names: Sequence[str], cache_path: Path | None) -> ClipPlan:
    """The plan a worker searches with: `names` (settings' `clip_match_methods`) measured
    (`calibrated_plan`), or every method available on `device` where `names` is empty; one
    name is that method alone, unmeasured."""
    unknown = [name for name in names if name not in clip_methods.METHODS]
    if unknown:
        raise InvalidMatchMethods(
            f"unknown CLIP match methods {unknown} (MODERATION_CLIP_MATCH_METHODS); "
            f"known: {', '.join(sorted(clip_methods.METHODS))}"
        )
    methods = [clip_methods.METHODS[name] for name in names]
    wrong_device = [m.name for m in methods if m.device != torch.device(device).type]
    if wrong_device:
        raise InvalidMatchMethods(
            f"CLIP match methods {wrong_device} do not run on {device} "
            "(MODERATION_CLIP_MATCH_METHODS)"
        )
    if len(methods) == 1:
        return ClipPlan.only(methods[0])
    return calibrated_plan(dim, device, cache_path, methods or None)


def calibrated_plan(
    dim: int, device: str, cache_path: Path | None, methods: Sequence[Method] | None = None
) -> ClipPlan:
    """The plan measured on this machine for `dim` and `device`: from `cache_path` if it
    holds one for the same machine key, else measured now (and stored there)."""
    methods = list(methods) if methods is not None else clip_methods.available(device)
    key = machine_key(dim, device, methods)
    cached = _read_cache(cache_path)
    if key in cached:
        try:
            return ClipPlan.from_json(cached[key])
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("malformed CLIP calibration in %s; measuring again", cache_path)
    started = time.perf_counter()
    load_before = _load_average()
    plan = calibrate(dim, device, methods)
    load = max(load_before, _load_average())
    logger.info(
        "CLIP match methods measured in %.1f s for %d-d on %s (load average %.1f): %s",
        time.perf_counter() - started,
        dim,
        device,
        load,
        plan.choices,
    )
    cores = len(os.sched_getaffinity(0))
    if load > cores:
        # Other work took the cores while the methods were timed: their order may be
        # the load's, not the machine's. Used for now, and measured again next start.
        logger.warning(
            "CLIP match methods measured on a busy machine (load %.1f on %d cores): not "
            "cached; measured again at the next start",
            load,
            cores,
        )
    elif cache_path is not None:
        _write_cache(cache_path, key, plan)
    return plan


def calibrate(
    dim: int,
    device: str,
    methods: Sequence[Method],
    sizes: Mapping[str, int] | None = None,
    batches: Sequence[int] = CALIBRATED_BATCHES,
) -> ClipPlan:
    """Time each method (see the module) and keep the fastest per size and batch. A method
    whose rounding does not hold to its proven margin here is left out (`honours_margin`)."""
    sizes = sizes or {"small": SMALL_ROWS, "large": LARGE_ROWS}
    rng = np.random.default_rng(0)
    choices: dict[str, dict[int, str]] = {}
    timings: dict[str, dict[int, dict[str, float]]] = {}
    sound = [method for method in methods if honours_margin(method, dim)]
    if not sound:
        raise InvalidMatchMethods(
            f"none of {[m.name for m in methods]} holds to its rounding margin on this "
            "machine; name others in MODERATION_CLIP_MATCH_METHODS"
        )
    for size_class, rows in sizes.items():
        vectors = _unit_rows(rng, rows, dim)
        stored = ClipRows.holding(
            np.arange(rows), np.zeros(rows, np.int64), vectors, plan=_all_of(sound), device=device
        )
        timings[size_class] = {}
        choices[size_class] = {}
        for batch in batches:
            queries = _unit_rows(rng, batch, dim)
            per_query = _time_methods(stored, sound, queries)
            recorded = {name: round(ms, 4) for name, ms in per_query.items()}
            timings[size_class][batch] = recorded
            # Chosen from the figures the plan records, so that they always justify it (two
            # methods within 0.1 µs of each other were recorded equal, the other chosen).
            choices[size_class][batch] = min(recorded, key=recorded.__getitem__)
        del stored, vectors
    return ClipPlan(choices, timings)


def honours_margin(method: Method, dim: int) -> bool:
    """Whether the method's products stay within `candidate_margin` of the exact inner
    product on inputs built to expose a narrow accumulator: equal coordinates, whose
    products a float16 or bfloat16 running sum rounds the same way at every step (by
    1e-2 to 1e-1 at 768-d), where a float32 sum errs by 1e-5."""
    rng = np.random.default_rng(1)
    level = np.full((1, dim), 1 / math.sqrt(dim), np.float32)
    ramp = np.linspace(0.2, 1.8, dim, dtype=np.float32)[None, :] / math.sqrt(dim)
    rows = np.concatenate([level, ramp, _unit_rows(rng, 14, dim)]).astype(np.float32)
    rows = np.ascontiguousarray(rows)
    stored = ClipRows.holding(
        np.arange(len(rows)),
        np.zeros(len(rows), np.int64),
        rows,
        plan=ClipPlan.only(method),
        device=method.device,
    )
    scored = stored.copy_for(method)
    queries = rows[:4]
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    norm = float(np.linalg.norm(rows.astype(np.float64), axis=1).max())
    margin = candidate_margin(dim, rounding_of(method.dtype), norm, norm)
    # Each pair is a candidate at its exact product less the margin, and not at its exact
    # product plus the margin: the product is within the margin of the exact one.
    for query, expected in enumerate(exact):
        for row, product in enumerate(expected.tolist()):
            found = [
                len(
                    clip_methods.candidates(
                        method,
                        queries[query : query + 1],
                        rows[row : row + 1],
                        scored[row : row + 1],
                        floor,
                    )[1]
                )
                for floor in (product - margin, product + margin)
            ]
            if found != [1, 0]:
                logger.warning(
                    "%s does not hold to its rounding margin here: not used", method.name
                )
                return False
    return True


def _time_methods(
    stored: ClipRows, methods: Sequence[Method], queries: np.ndarray
) -> dict[str, float]:
    """ms per query of each method's candidates over every row, the fastest of `ROUNDS`."""
    host = stored.view().payload
    best: dict[str, float] = {}
    timed = list(methods)
    for method in timed:  # warm-up: thread pools, first touch, oneDNN's kernels
        clip_methods.candidates(method, queries, host, stored.copy_for(method), 0.9)
    for _ in range(ROUNDS):
        for method in timed:
            scored = stored.copy_for(method)
            started = time.perf_counter()
            clip_methods.candidates(method, queries, host, scored, 0.9)
            if method.device == "cuda":
                torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - started) / len(queries)
            best[method.name] = min(best.get(method.name, math.inf), ms)
        fastest = min(best.values())
        timed = [m for m in timed if best[m.name] <= DROP_FACTOR * fastest]
    return best


def _all_of(methods: Sequence[Method]) -> ClipPlan:
    """A plan that holds every copy these methods read (for measuring them side by side)."""
    names = [method.name for method in methods]
    table = dict(zip(range(len(names)), names, strict=True))
    return ClipPlan({"small": table, "large": table}, {})


def _unit_rows(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((count, dim), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def _load_average() -> float:
    """The last minute's load average; 0 where the system does not say."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _read_cache(path: Path | None) -> dict[str, dict[str, object]]:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        logger.warning("unreadable CLIP calibration cache %s; measuring again", path)
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, plan: ClipPlan) -> None:
    """Add the plan under `key`, atomically: workers starting together may race."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cached = _read_cache(path)
        cached[key] = plan.as_json()
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as out:
            json.dump(cached, out, indent=1)
        os.replace(out.name, path)
    except OSError as error:
        logger.warning("could not cache the CLIP calibration in %s: %s", path, error)
