"""Choosing the CLIP candidate method by measurement, and keeping every method's copy of
the bank in step: whatever the plan, the hits are the exact ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moderation.banks import clip_calibration, clip_methods, clip_search
from moderation.banks.clip_calibration import (
    InvalidMatchMethods,
    calibrate,
    calibrated_plan,
    honours_margin,
    plan_for,
)
from moderation.banks.clip_plan import LARGE_FROM, ClipPlan, default_plan
from moderation.banks.clip_search import FLOAT_SLACK, ClipRows
from tests.vectors import at_cosine_distance

DIM = 32
CPU_METHODS = [method for method in clip_methods.METHODS.values() if method.device == "cpu"]
EVERY_CPU_METHOD = ClipPlan(
    {
        size: {batch: method.name for batch, method in enumerate(CPU_METHODS)}
        for size in ("small", "large")
    },
    {},
)
TINY = {"small": 64, "large": 512}


def _unit(rng: np.random.Generator, count: int) -> np.ndarray:
    rows = rng.standard_normal((count, DIM)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def test_a_calibration_chooses_the_fastest_measured_method_per_size_and_batch() -> None:
    methods = [clip_methods.FAISS_SCAN, clip_methods.NUMPY_FLOAT32, clip_methods.TORCH_FLOAT16]
    plan = calibrate(DIM, "cpu", methods, sizes=TINY, batches=(1, 8))
    assert set(plan.choices) == {"small", "large"}
    for size, table in plan.choices.items():
        assert set(table) == {1, 8}
        for batch, chosen in table.items():
            timed = plan.timings[size][batch]
            assert set(timed) <= {m.name for m in methods}
            assert chosen == min(timed, key=timed.__getitem__)
    assert plan.copies <= {("cpu", torch.float16)}


def test_the_nearest_calibrated_batch_and_the_banks_size_class_decide() -> None:
    plan = ClipPlan(
        {
            "small": {1: "faiss-scan", 8: "numpy-float32", 64: "torch-float32"},
            "large": {1: "torch-float16", 8: "torch-bfloat16", 64: "torch-bfloat16"},
        },
        {},
    )
    small, large = LARGE_FROM, LARGE_FROM + 1
    assert [plan.method_for(small, b).name for b in (1, 2, 3, 8, 22, 23, 500)] == [
        "faiss-scan",
        "faiss-scan",
        "numpy-float32",
        "numpy-float32",
        "numpy-float32",
        "torch-float32",
        "torch-float32",
    ]
    assert plan.method_for(large, 1).name == "torch-float16"
    assert plan.method_for(large, 64).name == "torch-bfloat16"
    assert plan.copies == {("cpu", torch.float16), ("cpu", torch.bfloat16)}
    assert ClipPlan.from_json(json.loads(json.dumps(plan.as_json()))) == plan


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's load as a quiet one's (the tests' own may be anything)."""
    monkeypatch.setattr(clip_calibration, "_load_average", lambda: 0.0)


@pytest.mark.usefixtures("quiet")
def test_the_measurement_is_cached_per_machine_and_read_back(tmp_path: Path) -> None:
    cache = tmp_path / "plans" / "clip.json"
    methods = [clip_methods.FAISS_SCAN, clip_methods.TORCH_FLOAT32]
    plan = calibrated_plan(DIM, "cpu", cache, methods)
    key = clip_calibration.machine_key(DIM, "cpu", methods)
    stored = json.loads(cache.read_text())
    assert ClipPlan.from_json(stored[key]) == plan
    # What the file says is what the next start uses: another choice written there is read.
    other = "torch-float32" if plan.choices["small"][1] == "faiss-scan" else "faiss-scan"
    stored[key]["choices"]["small"]["1"] = other
    cache.write_text(json.dumps(stored))
    assert calibrated_plan(DIM, "cpu", cache, methods).choices["small"][1] == other
    # Another dimension or method set is another machine key: measured, and kept beside.
    calibrated_plan(DIM * 2, "cpu", cache, methods)
    assert len(json.loads(cache.read_text())) == 2


def test_a_measurement_on_a_busy_machine_is_used_but_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clip_calibration, "_load_average", lambda: 99.0)
    cache = tmp_path / "clip.json"
    plan = calibrated_plan(DIM, "cpu", cache, [clip_methods.TORCH_FLOAT32])
    assert plan.choices["large"][1] == "torch-float32"
    assert not cache.exists()


@pytest.mark.usefixtures("quiet")
def test_an_unreadable_cache_is_measured_again(tmp_path: Path) -> None:
    cache = tmp_path / "clip.json"
    cache.write_text("{not json")
    plan = calibrated_plan(DIM, "cpu", cache, [clip_methods.TORCH_FLOAT32])
    assert plan.choices["large"][64] == "torch-float32"
    assert json.loads(cache.read_text())


def test_the_configured_methods() -> None:
    assert plan_for(DIM, "cpu", ["faiss-scan"], None) == ClipPlan.only(clip_methods.FAISS_SCAN)
    with pytest.raises(InvalidMatchMethods, match="unknown CLIP match methods \\['faiss-fast'\\]"):
        plan_for(DIM, "cpu", ["faiss-fast"], None)
    with pytest.raises(InvalidMatchMethods, match="do not run on cpu"):
        plan_for(DIM, "cpu", ["cuda-float16", "faiss-scan"], None)


@pytest.mark.parametrize("method", CPU_METHODS, ids=lambda method: method.name)
def test_every_cpu_method_holds_to_its_margin_here(method: clip_methods.Method) -> None:
    assert honours_margin(method, 768)


def test_a_method_outside_its_margin_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its margin a float16 product is off by more than nothing, and the check
    sees it: a kernel that summed in float16 would be caught the same way."""
    proven = clip_search.candidate_margin
    half = clip_search.ROUNDING[torch.float16]

    def no_float16_margin(
        dim: int, rounding: clip_search.Rounding, query_norm: float, bank_norm: float
    ) -> float:
        return 0.0 if rounding == half else proven(dim, rounding, query_norm, bank_norm)

    monkeypatch.setattr(clip_calibration, "candidate_margin", no_float16_margin)
    assert not honours_margin(clip_methods.TORCH_FLOAT16, 768)
    plan = calibrate(
        DIM, "cpu", [clip_methods.TORCH_FLOAT16, clip_methods.NUMPY_FLOAT32], sizes=TINY
    )
    assert {m.name for m in plan.methods} <= {"numpy-float32"}


def test_every_copy_stays_in_step_as_rows_are_appended_grown_and_retired() -> None:
    """A plan that reads float16 and bfloat16 copies: after appends past the capacity and
    retirements, every method finds exactly the entries within the radius."""
    rng = np.random.default_rng(5)
    rows = ClipRows(DIM, plan=EVERY_CPU_METHOD, capacity=2)
    queries = _unit(rng, 6)
    added = 0
    for step in range(6):
        count = 3 + 5 * step
        vectors = _unit(rng, count)
        # Half of each block planted around the queries, at 0.05 (in) and 0.0501 (out).
        for i in range(0, count, 2):
            distance = 0.05 if i % 4 == 0 else 0.0501
            vectors[i] = at_cosine_distance(queries[i % len(queries)], distance, seed=step * 97 + i)
        ids = np.arange(added, added + count)
        rows.append(ids, np.zeros(count, np.int64), vectors)
        added += count
        if step % 2:
            rows.retire_entries(rng.choice(added, 3, replace=False).tolist())
        bank = rows.bank({0: 0.05})
        view = rows.view()
        exact = 1.0 - queries.astype(np.float64) @ view.payload.astype(np.float64).T
        live = view.live(np.arange(len(view.entry_ids)))
        expected = [
            set(view.entry_ids[(row <= 0.05 + FLOAT_SLACK) & live].tolist()) for row in exact
        ]
        for method in CPU_METHODS:
            found = [{hit.bank_entry_id for hit in hits} for hits in bank.search(queries, method)]
            assert found == expected, method.name
    assert rows.capacity > 2
    assert set(rows.copies) == {("cpu", torch.float16), ("cpu", torch.bfloat16)}


def test_a_bank_without_a_plan_searches_as_before() -> None:
    assert ClipRows(DIM).plan == ClipPlan.only(clip_methods.TORCH_FLOAT32)
    assert default_plan("cuda") == ClipPlan.only(clip_methods.CUDA_FLOAT16)
