"""What measuring search on the golden set costs, and what the cross-encoder reranker costs.

    python bench/golden.py                                  # ~2 min on two loaded cores
    python bench/golden.py --corpus 100000 --queries 2000   # a larger set
    python bench/golden.py --skip-cross-encoder             # the evaluation run only

1. An evaluation run (`moderation.evaluation.service.run`, exactly what `moderation eval
   run` does after loading the model) over a corpus in PostgreSQL: synthetic CLIP-like
   768-d embeddings (`ClusteredSphere` of bench/search.py) with planted relevant sets.
   Each golden query is a fresh point q of the distribution with `--relevant` uploads
   planted near it (cosine about 0.9). Image queries are an upload at q (left out of its
   own results); text queries are a vector at cosine `TEXT_GAP` from q, the cross-modal
   gap of CLIP, where a text lies much further from its images than an image does. Reported:
   seconds per 1,000 golden queries, beside the same figures computed by brute force in
   numpy over the same vectors in memory (the baseline: the arithmetic alone, no database,
   no search service), and the figures themselves, which must agree (the index is exact
   below 25,000 vectors, `search_exact_max`).
2. The cross-encoder (`CrossEncoderReranker`: BLIP's image-text matching head) at
   `--candidates` candidates for one text query, on the CPU, with a random BLIP of the
   *base* architecture (the shapes of Salesforce/blip-itm-base-coco: ViT-B/16 at 384 px and
   a 12-layer BERT with cross-attention) written and loaded through `from_pretrained`; the
   candidates are real image files (640x480 JPEGs) read as search reads them (URI policy,
   decode limits). Reported beside the exact rerank of the same candidates, in the same run,
   and split into reading the images and scoring them.

JSON to `--out`; the figures are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import ClusteredSphere

if TYPE_CHECKING:
    from moderation.runtime import Runtime

BENCH_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation_bench_golden"
DIM = 768
K = 10
# Cosine between a text query and the image it describes: CLIP's text-image similarities
# sit far below its image-image ones.
TEXT_GAP = 0.6
# Planted relevant uploads: this far (cosine distance) from their query, and spread.
PLANTED_DISTANCE = (0.05, 0.15)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=int, default=20_000, help="Uploads searched.")
    parser.add_argument("--queries", type=int, default=1000, help="Golden queries, half text.")
    parser.add_argument("--relevant", type=int, default=3, help="Planted per query.")
    parser.add_argument("--candidates", type=int, default=100, help="Cross-encoder's top.")
    parser.add_argument("--cross-encoder-queries", type=int, default=1)
    parser.add_argument("--skip-cross-encoder", action="store_true")
    parser.add_argument("--architecture", default="base", help="Random BLIP: base or tiny.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/golden.json"))
    return parser.parse_args()


def _unit(x: np.ndarray) -> np.ndarray:
    normalised: np.ndarray = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return normalised


def _at_cosine(anchors: np.ndarray, cosines: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row, a unit vector at the given cosine from the anchor, in a random direction."""
    other = rng.standard_normal(anchors.shape).astype(np.float32)
    other -= np.sum(other * anchors, axis=1, keepdims=True) * anchors
    other = _unit(other)
    c = cosines[:, None].astype(np.float32)
    return _unit(c * anchors + np.sqrt(1 - c**2) * other)


def synthetic(corpus: int, queries: int, relevant: int) -> dict[str, np.ndarray]:
    """Background, queries, planted relevant vectors and text query vectors."""
    rng = np.random.default_rng(0)
    planted = queries * relevant
    image_queries = queries - queries // 2
    background = corpus - planted - image_queries
    if background < 0:
        raise SystemExit("the corpus is smaller than the planted uploads")
    sphere = ClusteredSphere.make(corpus, DIM, seed=0)
    points = np.concatenate(list(sphere.sample(background, seed=1)))
    anchors = np.concatenate(list(sphere.sample(queries, seed=2)))
    distances = rng.uniform(*PLANTED_DISTANCE, size=planted)
    near = _at_cosine(np.repeat(anchors, relevant, axis=0), 1 - distances, rng)
    texts = _at_cosine(anchors, np.full(queries, TEXT_GAP), rng)
    return {"background": points, "anchors": anchors, "planted": near, "texts": texts}


def load(
    runtime: Runtime, data: dict[str, np.ndarray], queries: int, relevant: int
) -> dict[str, Any]:
    """A fresh schema; the uploads and embeddings by COPY; the golden set. Query i is text
    for even i, an upload at its anchor for odd i."""
    from sqlalchemy import text

    from moderation import pg_copy, schema
    from moderation.embedding.service import get_or_create_model

    schema.upgrade(runtime.settings.database_url)
    with runtime.engine.begin() as conn:
        conn.execute(text("TRUNCATE evaluation_runs, golden_queries, embeddings, uploads CASCADE"))
    is_text = np.arange(queries) % 2 == 0
    vectors = np.concatenate(
        [data["planted"], data["anchors"][~is_text], data["background"]]
    ).astype("<f4")
    with runtime.session() as session:
        model = get_or_create_model(session, "bench-golden-768", DIM)
        ids = np.array(
            session.scalars(
                text(
                    "INSERT INTO uploads (uri, status, attempts, enqueued_at, finished_at) "
                    "SELECT 'file:///bench/' || i || '.jpg', 'screened', 1, now(), now() "
                    "FROM generate_series(1, :n) AS i ORDER BY i RETURNING id"
                ),
                {"n": len(vectors)},
            ).all()
        )
        fields = [("upload_id", ">i8"), ("model_id", ">i8"), ("frame_index", ">i4")]
        fields.append(("vector", f"V{4 * DIM}"))
        for start in range(0, len(ids), 20_000):
            chunk = slice(start, start + 20_000)
            rows = pg_copy.new_rows(fields, len(ids[chunk]))
            rows["upload_id"] = ids[chunk]
            rows["model_id"] = model.id
            rows["vector"] = np.ascontiguousarray(vectors[chunk]).view(f"V{4 * DIM}").reshape(-1)
            pg_copy.copy_in(session, "embeddings", rows)
        planted_ids = ids[: queries * relevant].reshape(queries, relevant)
        query_uploads = dict(
            zip(
                np.flatnonzero(~is_text).tolist(),
                ids[queries * relevant : queries * relevant + int((~is_text).sum())].tolist(),
                strict=True,
            )
        )
        query_ids = session.scalars(
            text(
                "INSERT INTO golden_queries (modality, origin, text, upload_id, created_by) "
                "SELECT CASE WHEN t IS NULL THEN 'image' ELSE 'text' END, 'analyst', t, u, "
                "'bench' FROM unnest(CAST(:texts AS text[]), CAST(:uploads AS bigint[])) "
                "WITH ORDINALITY AS q(t, u, n) ORDER BY n RETURNING id"
            ),
            {
                "texts": [f"text query {i}" if is_text[i] else None for i in range(queries)],
                "uploads": [query_uploads.get(i) for i in range(queries)],
            },
        ).all()
        session.execute(
            text(
                "INSERT INTO golden_relevant (query_id, upload_id, origin, added_by) "
                "SELECT q, u, 'analyst', 'bench' "
                "FROM unnest(CAST(:queries AS bigint[]), CAST(:uploads AS bigint[])) AS r(q, u)"
            ),
            {
                "queries": np.repeat(query_ids, relevant).tolist(),
                "uploads": planted_ids.reshape(-1).tolist(),
            },
        )
        model_id = model.id
    return {
        "model_id": model_id,
        "ids": ids,
        "vectors": vectors,
        "planted_ids": planted_ids,
        "is_text": is_text,
        "query_uploads": query_uploads,
    }


def brute_force(data: dict[str, np.ndarray], loaded: dict[str, Any], k: int) -> dict[str, Any]:
    """The same figures in numpy, from the vectors in memory: the baseline."""
    started = time.perf_counter()
    ids, vectors, is_text = loaded["ids"], loaded["vectors"], loaded["is_text"]
    queries = np.where(is_text[:, None], data["texts"], data["anchors"])
    scores = queries @ vectors.T
    for i, upload_id in loaded["query_uploads"].items():
        scores[i, ids == upload_id] = -np.inf  # an upload query leaves itself out
    top = ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]
    figures: dict[str, dict[str, float]] = {}
    for modality, chosen in (("text", is_text), ("image", ~is_text)):
        hits = np.array(
            [
                np.isin(row, planted)
                for row, planted in zip(top[chosen], loaded["planted_ids"][chosen], strict=True)
            ]
        )
        found = hits.sum(axis=1)
        first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, np.inf)
        figures[modality] = {
            "recall": float(np.mean(found / loaded["planted_ids"].shape[1])),
            "precision": float(np.mean(found / k)),
            "mrr": float(np.mean(1.0 / first)),
        }
    return {"seconds": time.perf_counter() - started, "figures": figures}


def evaluation_run(
    runtime: Runtime, data: dict[str, np.ndarray], loaded: dict[str, Any], k: int
) -> dict[str, Any]:
    from moderation.embedding.models import EmbeddingModel
    from moderation.evaluation import service
    from moderation.search.rerank import ExactReranker, SearchQuery
    from moderation.search.store import IndexSettings, open_index

    settings = runtime.settings
    with runtime.session() as session:
        model = session.get_one(EmbeddingModel, loaded["model_id"])
    started = time.perf_counter()
    index = open_index(runtime.engine, model, IndexSettings.from_settings(settings))
    opened_s = time.perf_counter() - started
    by_text = {f"text query {i}": data["texts"][i] for i in np.flatnonzero(loaded["is_text"])}

    def text_query(query: str) -> SearchQuery:
        return SearchQuery(vector=by_text[query], model_id=index.model_id, text=query)

    def no_images(uri: str) -> SearchQuery:
        raise AssertionError("the benchmark's golden set has no image URIs")

    started, cpu_started = time.perf_counter(), time.process_time()
    with runtime.session() as session:
        run = service.run(
            session,
            index,
            service.QueryMaker(text=text_query, image_uri=no_images),
            reranker=ExactReranker(),
            reranker_name="exact",
            k=k,
            candidates=settings.search_candidates,
            exact_scan_max=settings.search_exact_scan_max,
            trigger="bench",
            drop_margin=settings.eval_drop_margin,
        )
        run_id = run.id
    seconds = time.perf_counter() - started
    # This process's CPU time: on a loaded machine the wall time also counts the waiting.
    cpu_seconds = time.process_time() - cpu_started
    with runtime.session() as session:
        view = service.run_view(session, run_id)
    queries = sum(int(f["queries"]) for f in view.figures.values())
    return {
        "seconds": seconds,
        "seconds_per_1000_queries": seconds / queries * 1000,
        "cpu_seconds_per_1000_queries": cpu_seconds / queries * 1000,
        "queries": queries,
        "index_open_seconds": opened_s,
        "index_kind": index.kind.value,
        "corpus_size": view.corpus_size,
        "figures": view.figures,
    }


def cross_encoder(runtime: Runtime, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The cross-encoder against the exact rerank, at `args.candidates` candidates."""
    import torch
    from sqlalchemy import text

    from moderation.http.limits import ApiLimits
    from moderation.search.blip import matcher, write_random_blip
    from moderation.search.rerank import Candidate, ExactReranker, SearchQuery
    from moderation.search.rerankers import CrossEncoderReranker, upload_images

    settings = runtime.settings
    # What the API process would read the candidates under.
    limits = ApiLimits.from_settings(settings)
    rng = np.random.default_rng(3)
    started = time.perf_counter()
    checkpoint = write_random_blip(workdir / f"blip-{args.architecture}", args.architecture)
    written_s = time.perf_counter() - started
    images_dir = workdir / "images"
    images_dir.mkdir()
    uris = []
    for i in range(args.candidates):
        # Smooth colour fields with noise: JPEG-sized like photos, not like white noise.
        base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((640, 480), Image.Resampling.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (480, 640, 3))
        path = images_dir / f"{i}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        uris.append(path.as_uri())
    query_vector = _unit(rng.standard_normal(DIM).astype(np.float32))
    vectors = _at_cosine(
        np.repeat(query_vector[None], len(uris), 0), rng.uniform(0.2, 0.4, len(uris)), rng
    )
    with runtime.session() as session:
        upload_ids = session.scalars(
            text(
                "INSERT INTO uploads (uri, status, attempts, enqueued_at, finished_at) "
                "SELECT u, 'screened', 1, now(), now() FROM unnest(CAST(:uris AS text[])) "
                "WITH ORDINALITY AS x(u, n) ORDER BY n RETURNING id"
            ),
            {"uris": uris},
        ).all()
    candidates = [
        Candidate(i, upload_id, 0, vector, 0.0)
        for i, (upload_id, vector) in enumerate(zip(upload_ids, vectors, strict=True))
    ]
    query = SearchQuery(vector=query_vector, text="a red sports car parked by the sea")

    exact = ExactReranker()
    repeats = 200
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        exact.rerank(query, candidates)
    exact_s = (time.perf_counter() - started) / repeats
    exact_cpu_s = (time.process_time() - cpu_started) / repeats

    scorer = matcher(str(checkpoint), "cpu")
    started = time.perf_counter()
    with runtime.session() as session:
        warm = upload_images(session, settings, limits)(upload_ids[:2])
    scorer.scores(query.text or "", list(warm.values()))  # loads the weights
    load_s = time.perf_counter() - started
    totals, cpu, reading = [], [], []
    with runtime.session() as session:
        images = upload_images(session, settings, limits)

        def timed_images(ids: Sequence[int]) -> dict[int, Image.Image]:
            started = time.perf_counter()
            read = images(ids)
            reading.append(time.perf_counter() - started)
            return read

        reranker = CrossEncoderReranker(scorer, timed_images, top=args.candidates)
        for _ in range(args.cross_encoder_queries):
            started, cpu_started = time.perf_counter(), time.process_time()
            ranked = reranker.rerank(query, candidates)
            totals.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
            assert len(ranked) == len(candidates)
    total_s, reading_s = float(np.median(totals)), float(np.median(reading))
    return {
        "architecture": args.architecture,
        "candidates": args.candidates,
        "queries_timed": args.cross_encoder_queries,
        "torch_threads": torch.get_num_threads(),
        "checkpoint_write_seconds": written_s,
        "load_seconds": load_s,
        "exact_rerank_ms_per_query": exact_s * 1000,
        "exact_rerank_cpu_ms_per_query": exact_cpu_s * 1000,
        "cross_encoder_ms_per_query": total_s * 1000,
        # CPU time of this process (all its threads): the cost on an idle machine is
        # about this divided by the threads torch uses.
        "cross_encoder_cpu_ms_per_query": float(np.median(cpu)) * 1000,
        # Fetching and decoding the candidates' images; the rest is the exact pass and BLIP.
        "reading_images_ms": reading_s * 1000,
        "scoring_ms": (total_s - reading_s) * 1000,
        "ratio": total_s / exact_s,
    }


def main() -> None:
    from moderation.config import Settings
    from moderation.runtime import Runtime

    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="moderation-bench-golden-"))
    # The environment's settings, on the benchmark's own database and working directory.
    runtime = Runtime(
        Settings(
            database_url=os.environ.get("MODERATION_BENCH_DATABASE_URL", BENCH_DATABASE),
            device="cpu",
            index_dir=workdir / "index",
            allowed_uri_prefixes=[f"{workdir.resolve().as_uri()}/"],
        )
    )
    try:
        measure(runtime, args, workdir)
    finally:
        runtime.close()
        # The random BLIP base checkpoint alone is ~900 MB.
        shutil.rmtree(workdir, ignore_errors=True)


def measure(runtime: Runtime, args: argparse.Namespace, workdir: Path) -> None:
    data = synthetic(args.corpus, args.queries, args.relevant)
    started = time.perf_counter()
    loaded = load(runtime, data, args.queries, args.relevant)
    load_s = time.perf_counter() - started
    baseline = brute_force(data, loaded, K)
    measured = evaluation_run(runtime, data, loaded, K)
    results: dict[str, Any] = {
        "corpus": args.corpus,
        "dim": DIM,
        "k": K,
        "relevant_per_query": args.relevant,
        "load_seconds": load_s,
        "evaluation": measured,
        "brute_force_baseline": {
            **baseline,
            "seconds_per_1000_queries": baseline["seconds"] / args.queries * 1000,
        },
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "machine": platform.platform(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not args.skip_cross_encoder:
        results["cross_encoder"] = cross_encoder(runtime, workdir, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(
        f"evaluation run: {measured['seconds_per_1000_queries']:.2f} s per 1,000 golden "
        f"queries ({measured['cpu_seconds_per_1000_queries']:.2f} s CPU) over "
        f"{measured['corpus_size']:,} vectors ({measured['index_kind']}); "
        f"brute force in numpy: {results['brute_force_baseline']['seconds_per_1000_queries']:.3f} s"
    )
    for modality in ("text", "image"):
        served = measured["figures"][modality]
        expected = baseline["figures"][modality]
        print(
            f"  {modality}: recall@{K} {served['recall']:.4f} (numpy {expected['recall']:.4f}), "
            f"precision {served['precision']:.4f} ({expected['precision']:.4f}), "
            f"MRR {served['mrr']:.4f} ({expected['mrr']:.4f})"
        )
    if "cross_encoder" in results:
        ce = results["cross_encoder"]
        print(
            f"cross-encoder (random BLIP {ce['architecture']}, CPU, {ce['torch_threads']} "
            f"threads) at {ce['candidates']} candidates: {ce['cross_encoder_ms_per_query']:,.0f} "
            f"ms per query, {ce['cross_encoder_cpu_ms_per_query']:,.0f} ms CPU (reading images "
            f"{ce['reading_images_ms']:,.0f} ms, scoring {ce['scoring_ms']:,.0f} ms); exact "
            f"rerank {ce['exact_rerank_ms_per_query']:.3f} ms"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
