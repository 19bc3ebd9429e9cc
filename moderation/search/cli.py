"""`moderation search` and `moderation index rebuild|eval`.

Faiss, the index and the model are imported inside the commands: the command line as a
whole should start fast, and most commands never search.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click

from moderation.console import emit_json, emit_table
from moderation.review.models import ReviewStatus
from moderation.runtime import Runtime, pass_runtime
from moderation.screening.models import UploadStatus
from moderation.search.map_cli import index_map


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@click.command("search")
@click.option("--text", help="Search by description, through the model's text tower.")
@click.option("--image", help="Search by example: an image path or URI.")
@click.option("--upload", "upload_id", type=int, help="Search by example: an upload's id.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--from", "screened_from", type=click.DateTime(), help="Screened at or after (UTC).")
@click.option("--until", "screened_until", type=click.DateTime(), help="Screened before (UTC).")
@click.option("--status", type=click.Choice([s.value for s in UploadStatus]))
@click.option("--has-hit/--no-hit", "has_hit", default=None, help="Only uploads with/without hits.")
@click.option("--bank", help="Only uploads with a hit on this bank.")
@click.option("--error-code", help="Only uploads that failed with this code.")
@click.option(
    "--review-status",
    type=click.Choice([s.value for s in ReviewStatus]),
    help="Only uploads with a hit in this review status.",
)
@click.option(
    "--model",
    "model_name",
    help="A registered model to search instead of the active one (a candidate, to judge it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def search(
    runtime: Runtime,
    text: str | None,
    image: str | None,
    upload_id: int | None,
    k: int,
    screened_from: datetime | None,
    screened_until: datetime | None,
    status: str | None,
    has_hit: bool | None,
    bank: str | None,
    error_code: str | None,
    review_status: str | None,
    model_name: str | None,
    as_json: bool,
) -> None:
    """The K screened uploads most like a text, an image or an upload (one of them), under
    the active model (or --model)."""
    from moderation.search import service
    from moderation.search.runtime import SearchRuntime

    if sum(option is not None for option in (text, image, upload_id)) != 1:
        raise click.UsageError("give exactly one of --text, --image or --upload")
    filters = service.Filters(
        screened_from=_utc(screened_from),
        screened_until=_utc(screened_until),
        status=UploadStatus(status) if status else None,
        has_hit=has_hit,
        bank=bank,
        error_code=error_code,
        review_status=ReviewStatus(review_status) if review_status else None,
    )
    searches = SearchRuntime(runtime, follow=False, model=model_name)
    if text is not None:
        query = searches.text_query(text)
    elif image is not None:
        query = searches.fetched_image_query(image, operator_file=True)
    else:
        assert upload_id is not None
        query = searches.upload_query(upload_id)
    results = searches.search(query, k, filters)
    if as_json:
        emit_json(results)
        return
    rows = [
        {
            **vars(r),
            "hits": ", ".join(f"{h.bank}/{h.signal}" for h in r.hits) or None,
        }
        for r in results
    ]
    emit_table(
        rows, ["upload_id", "score", "status", "screened_at", "hits", "uri"], empty="no results"
    )


@click.group()
def index() -> None:
    """The similarity index behind `moderation search`."""


index.add_command(index_map)


@contextmanager
def _bar(length: int, label: str) -> Iterator[Any]:
    # A bar on a terminal; nothing elsewhere (logs and pipes get the summary line).
    with click.progressbar(
        length=length, label=label, file=sys.stderr, hidden=not sys.stderr.isatty()
    ) as bar:
        yield bar


@index.command("rebuild")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def rebuild(runtime: Runtime, as_json: bool) -> None:
    """Build the active model's index from the embeddings table, from scratch, and
    save it as the snapshot searches start from."""
    from moderation.embedding import registry
    from moderation.search.store import (
        IndexSettings,
        build,
        count_embeddings,
        model_named,
        save,
        settle,
    )

    settings = runtime.settings
    config = IndexSettings.from_settings(settings)
    engine = runtime.engine
    started = time.perf_counter()
    with runtime.session() as session:
        model = registry.active_model(session) or model_named(session, settings.resolved_model())
        total = count_embeddings(session, model.id)
        session.expunge(model)
    if settings.search_backend == "milvus":
        _rebuild_milvus(runtime, model, as_json, started)
        return
    with _bar(total, "reading") as reading, _bar(total, "indexing") as indexing:
        built = build(engine, model, config, reading=reading.update, indexing=indexing.update)
    settle(built, engine)
    path = save(built, config)
    summary = {
        "model": built.model_name,
        "vectors": built.size,
        "kind": built.kind.value,
        "parameters": built.parameters,
        "checkpoint": built.checkpoint,
        "snapshot": str(path),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if as_json:
        emit_json(summary)
    else:
        click.echo(
            f"indexed {summary['vectors']} vectors of {summary['model']} as {summary['kind']} "
            f"{summary['parameters']} in {summary['seconds']} s; saved {path}"
        )


def _rebuild_milvus(runtime: Runtime, model: Any, as_json: bool, started: float) -> None:
    """A new collection filled and tuned beside the serving one, then the alias moved."""
    from moderation.search import milvus_sync
    from moderation.search.milvus_index import Milvus, MilvusSettings

    settings = runtime.settings
    summary = milvus_sync.rebuild(
        runtime.engine,
        Milvus(MilvusSettings.from_settings(settings)),
        model,
        milvus_sync.SyncSettings.from_settings(settings),
    )
    summary["seconds"] = round(time.perf_counter() - started, 2)
    if as_json:
        emit_json(summary)
    else:
        click.echo(
            f"built {summary['collection']} for {summary['model']} and moved {summary['alias']} "
            f"to it (was {summary['replaced']}) in {summary['seconds']} s"
        )


@index.command("sync")
@click.option("--once", is_flag=True, help="One pass, then exit (status 4 if Milvus is away).")
@click.option("--model", "model_name", help="Only this registered model's collection.")
@click.option("--json", "as_json", is_flag=True, help="With --once: print each model's pass.")
@click.option(
    "--check",
    is_flag=True,
    help="Sync nothing: exit 1 unless every collection's last completed pass started within "
    "MODERATION_MILVUS_MAX_LAG_S (a health check; reads PostgreSQL only).",
)
@pass_runtime
def sync(runtime: Runtime, once: bool, model_name: str | None, as_json: bool, check: bool) -> None:
    """Keep the Milvus collections (MODERATION_SEARCH_BACKEND=milvus) equal to PostgreSQL:
    new embeddings, deletions, and changes of the filter fields (review decisions, hits,
    statuses), every MODERATION_MILVUS_SYNC_INTERVAL_S until stopped. The first pass of a
    model creates, fills and tunes its collection. Run one per installation."""
    import signal
    import threading

    from moderation.search import milvus_sync
    from moderation.search.milvus_index import Milvus, MilvusSettings

    settings = runtime.settings
    if check:
        with runtime.session() as session:
            lags = milvus_sync.lags(session)
        behind = [
            lag for lag in lags if lag.seconds is None or lag.seconds > settings.milvus_max_lag_s
        ]
        for lag in lags:
            since = "no pass completed" if lag.seconds is None else f"{lag.seconds:.0f} s"
            click.echo(f"{lag.collection} ({lag.model}): {lag.rows} rows behind, {since}")
        if not lags or behind:
            raise click.ClickException(
                "no collection is synced yet"
                if not lags
                else f"{len(behind)} collection(s) behind by more than "
                f"{settings.milvus_max_lag_s:g} s (MODERATION_MILVUS_MAX_LAG_S)"
            )
        return
    loop = milvus_sync.SyncLoop(
        runtime.engine,
        Milvus(MilvusSettings.from_settings(settings)),
        milvus_sync.SyncSettings.from_settings(settings),
        milvus_sync.synced_models(settings, model_name),
    )
    if once:
        reports = loop.run_once()
        if as_json:
            emit_json({name: vars(report) for name, report in reports.items()})
        else:
            for name, report in reports.items():
                click.echo(
                    f"{name}: {report.written} written, {report.deleted} deleted, "
                    f"checkpoint {report.embeddings_checkpoint}"
                )
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    click.echo(f"syncing to Milvus at {settings.milvus_uri}; Ctrl-C stops", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        loop.run(stop, settings.milvus_sync_interval_s)


@index.command("eval")
@click.option("--queries", default=200, show_default=True, type=click.IntRange(1))
@click.option("-k", "k", default=None, type=click.IntRange(1), help="Default: search_recall_k.")
@click.option("--seed", type=int, help="Sample the same queries again.")
@click.option("--json", "as_json", is_flag=True, help="Print the history of evaluations as JSON.")
@pass_runtime
def eval_(runtime: Runtime, queries: int, k: int | None, seed: int | None, as_json: bool) -> None:
    """Measure recall@k of the serving index against exact search, with stored vectors as
    queries, and record it (with the corpus size and index parameters)."""
    from moderation.search import service
    from moderation.search.runtime import SearchRuntime
    from moderation.search.store import IndexSettings, outgrown_by

    settings = runtime.settings
    followed = SearchRuntime(runtime, follow=False).index()
    with runtime.session() as session:
        evaluation = service.evaluate(
            session,
            followed,
            queries=queries,
            k=k or settings.search_recall_k,
            candidates=settings.search_candidates,
            seed=seed,
        )
        history = [_evaluation_row(e) for e in service.evaluation_history(session)]
    if as_json:
        emit_json(history)
        return
    click.echo(
        f"recall@{evaluation.k} {evaluation.recall:.4f} over {evaluation.queries} queries: "
        f"{evaluation.index_kind} {evaluation.parameters}, {evaluation.corpus_size} vectors"
    )
    emit_table(
        history,
        ["id", "created_at", "model_id", "index_kind", "corpus_size", "k", "recall"],
        empty="no evaluations",
    )
    from moderation.search.follow import FollowedIndex

    if isinstance(followed, FollowedIndex) and (
        note := outgrown_by(followed, IndexSettings.from_settings(settings).plan)
    ):
        click.echo(note, err=True)


def _evaluation_row(evaluation: Any) -> dict[str, Any]:
    return {
        "id": evaluation.id,
        "created_at": evaluation.created_at,
        "model_id": evaluation.model_id,
        "index_kind": evaluation.index_kind,
        "parameters": evaluation.parameters,
        "corpus_size": evaluation.corpus_size,
        "k": evaluation.k,
        "queries": evaluation.queries,
        "recall": evaluation.recall,
        "seconds": evaluation.seconds,
    }
