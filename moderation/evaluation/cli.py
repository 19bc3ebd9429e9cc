"""`moderation golden add|list|remove|sync`, `moderation eval run|compare|history`, and
`moderation model activate`, which judges the candidate on the golden set first.

The model, the index and the reranker are imported inside the commands that search: the
command line as a whole should start fast.
"""

from __future__ import annotations

from typing import Any

import click

from moderation.audit.service import cli_actor
from moderation.console import emit_json, emit_table
from moderation.evaluation import golden as golden_set
from moderation.evaluation import service
from moderation.evaluation.models import Modality
from moderation.runtime import Runtime, pass_runtime

RERANKER_CHOICE = click.Choice(["exact", "cross-encoder"])


@click.group()
def golden() -> None:
    """The golden set: queries and the uploads each should find."""


@golden.command("add")
@click.option("--text", help="A text query (text→image).")
@click.option("--image", help="An example image's URI (image→image), fetched at each run.")
@click.option("--upload", "upload_id", type=int, help="An upload as the example (image→image).")
@click.option(
    "--relevant",
    "relevant",
    type=int,
    multiple=True,
    required=True,
    help="An upload the query should find (repeat for several).",
)
@click.option("--note", help="Why these are relevant, for the next analyst.")
@pass_runtime
def add(
    runtime: Runtime,
    text: str | None,
    image: str | None,
    upload_id: int | None,
    relevant: tuple[int, ...],
    note: str | None,
) -> None:
    """Add a golden query (one of --text, --image, --upload) with its relevant uploads; the
    same query again adds to its relevant uploads."""
    subject = golden_set.QuerySubject(text=text, image_uri=image, upload_id=upload_id)
    with runtime.session() as session:
        query = golden_set.add_query(session, subject, relevant, actor=cli_actor(), note=note)
        click.echo(
            f"golden query {query.id} ({query.modality.value}): {golden_set.describe(query)}"
        )


@golden.command("list")
@click.option("--modality", type=click.Choice([m.value for m in Modality]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def list_(runtime: Runtime, modality: str | None, as_json: bool) -> None:
    """The golden queries, with their relevant uploads."""
    with runtime.session() as session:
        views = golden_set.list_queries(session, Modality(modality) if modality else None)
    if as_json:
        emit_json(views)
        return
    emit_table(
        [{**vars(v), "relevant": " ".join(map(str, v.relevant))} for v in views],
        ["id", "modality", "origin", "subject", "relevant"],
        empty="no golden queries",
        widest={"subject": 60, "relevant": 40},
    )


@golden.command("remove")
@click.argument("query_id", type=int)
@pass_runtime
def remove(runtime: Runtime, query_id: int) -> None:
    """Remove a golden query and its relevant uploads."""
    with runtime.session() as session:
        golden_set.remove_query(session, query_id, actor=cli_actor())
    click.echo(f"golden query {query_id} removed")


@golden.command("sync")
@pass_runtime
def sync(runtime: Runtime) -> None:
    """Bring the review-derived part of the set up to date now (each run does it too)."""
    with runtime.session() as session:
        done = golden_set.sync_from_review(session)
    click.echo(
        f"{done.queries_added} queries and {done.pairs_added} relevant uploads added from "
        f"confirmed hits; {done.pairs_removed} removed (no longer confirmed)"
    )


@click.group("eval")
def eval_() -> None:
    """Search quality on the golden set: recall@k, precision@k and MRR per modality."""


def _summary_rows(view: service.RunView) -> list[dict[str, Any]]:
    return [{"modality": modality, **figures} for modality, figures in sorted(view.figures.items())]


def _show(view: service.RunView) -> None:
    click.echo(
        f"run {view.id}: {view.model}, reranker {view.reranker}, k={view.k}, "
        f"{view.corpus_size} vectors, {view.seconds:.2f} s"
    )
    emit_table(
        _summary_rows(view),
        ["modality", "queries", "skipped", "recall", "precision", "mrr"],
        empty="no golden queries",
    )
    if view.regressed:
        falls = ", ".join(f"{m} -{d:.4f}" for m, d in sorted(view.drops.items()) if d > 0)
        click.echo(f"warning: recall fell beyond the margin since the last run: {falls}", err=True)


def _evaluate(
    runtime: Runtime, model: str | None, reranker: str | None, k: int | None
) -> service.RunView:
    from moderation.evaluation.runner import evaluate

    return evaluate(runtime, model=model, reranker=reranker, k=k)


@eval_.command("run")
@click.option("--model", help="A registered model (default: the active one).")
@click.option("--reranker", type=RERANKER_CHOICE, help="Default: MODERATION_SEARCH_RERANKER.")
@click.option("-k", "k", type=click.IntRange(1, 1000), help="Default: MODERATION_EVAL_K.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def run(
    runtime: Runtime, model: str | None, reranker: str | None, k: int | None, as_json: bool
) -> None:
    """Measure search on the golden set and record the run."""
    view = _evaluate(runtime, model, reranker, k)
    if as_json:
        emit_json(view)
    else:
        _show(view)


@eval_.command("compare")
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Twice, to compare two models (under one reranker); once or never for one model.",
)
@click.option(
    "--reranker",
    "rerankers",
    type=RERANKER_CHOICE,
    multiple=True,
    help="Twice, to compare two rerankers (default: exact and cross-encoder).",
)
@click.option("-k", "k", type=click.IntRange(1, 1000), help="Default: MODERATION_EVAL_K.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("configurations", nargs=-1)
@pass_runtime
def compare(
    runtime: Runtime,
    models: tuple[str, ...],
    rerankers: tuple[str, ...],
    k: int | None,
    as_json: bool,
    configurations: tuple[str, ...],
) -> None:
    """Run two configurations on the golden set now and show them side by side: two
    models, or two rerankers (the exact rerank against the cross-encoder by default).
    `compare A B` names them directly: two rerankers, or else two models."""
    if configurations:
        if len(configurations) != 2 or models or rerankers:
            raise click.UsageError("compare A B: two models or two rerankers, and no options")
        if all(name in RERANKER_CHOICE.choices for name in configurations):
            rerankers = configurations
        else:
            models = configurations
    if len(models) > 2 or len(rerankers) > 2:
        raise click.UsageError("compare two configurations: at most two --model or --reranker")
    if len(models) == 2 and len(rerankers) == 2:
        raise click.UsageError("vary the model or the reranker, not both")
    pairs: list[tuple[str | None, str | None]]
    if len(models) == 2:
        pairs = [(m, rerankers[0] if rerankers else None) for m in models]
    elif len(rerankers) == 1:
        raise click.UsageError("give --reranker twice, or not at all")
    else:
        chosen = list(rerankers) if rerankers else ["exact", "cross-encoder"]
        pairs = [(models[0] if models else None, r) for r in chosen]
    a, b = (_evaluate(runtime, model, reranker, k) for model, reranker in pairs)
    rows = [
        {
            "modality": row.modality,
            "measure": row.measure,
            "a": row.a,
            "b": row.b,
            "change": row.change,
        }
        for row in service.compare(a, b)
    ]
    if as_json:
        emit_json({"a": a, "b": b, "figures": rows})
        return
    for label, view in (("A", a), ("B", b)):
        click.echo(
            f"{label}: run {view.id}, {view.model}, reranker {view.reranker}, "
            f"{view.corpus_size} vectors"
        )
    emit_table(
        rows, ["modality", "measure", "a", "b", "change"], empty="no modality measured by both"
    )


@eval_.command("history")
@click.option("--model", help="Only this model's runs.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def history(runtime: Runtime, model: str | None, limit: int, as_json: bool) -> None:
    """Recall on the golden set by date and corpus size, oldest first."""
    with runtime.session() as session:
        views = service.history(session, model=model, limit=limit)
    if as_json:
        emit_json(views)
        return
    rows = []
    for view in views:
        text_figures = view.figures.get(Modality.TEXT.value, {})
        image_figures = view.figures.get(Modality.IMAGE.value, {})
        rows.append(
            {
                "id": view.id,
                "date": view.created_at,
                "model": view.model,
                "reranker": view.reranker,
                "corpus": view.corpus_size,
                "text_recall": text_figures.get("recall") if text_figures.get("queries") else None,
                "image_recall": (
                    image_figures.get("recall") if image_figures.get("queries") else None
                ),
                "regressed": "yes" if view.regressed else "",
            }
        )
    emit_table(
        rows,
        ["id", "date", "model", "reranker", "corpus", "text_recall", "image_recall", "regressed"],
        headers={"text_recall": f"text r@{views[-1].k}" if views else "text"}
        | {"image_recall": f"image r@{views[-1].k}" if views else "image"},
        empty="no runs",
        widest={"model": 40},
    )


@click.command("activate")
@click.argument("name")
@click.option(
    "--require-no-regression",
    is_flag=True,
    help="Refuse a candidate whose recall on the golden set is below the active model's "
    "for any modality (or that no golden query could judge).",
)
@pass_runtime
def activate(runtime: Runtime, name: str, require_no_regression: bool) -> None:
    """Make a candidate the active model: searches answer with it within
    MODERATION_MODEL_POLL_S. The candidate and the active model are measured on the golden
    set first and shown side by side (both runs are recorded). The previous active model
    stays computed, as a candidate, until it is retired."""
    from moderation.embedding import registry
    from moderation.evaluation.gate import judge_candidate

    verdict = judge_candidate(runtime, name)
    if verdict is not None:
        click.echo(
            f"golden set, {verdict.active.reranker} rerank, k={verdict.active.k}: "
            f"A {verdict.active.model} (active), B {verdict.candidate.model} (candidate)"
        )
        emit_table(
            [
                {"modality": f.modality, "measure": f.measure, "a": f.a, "b": f.b,
                 "change": f.change}
                for f in verdict.figures
            ],
            ["modality", "measure", "a", "b", "change"],
            empty="no modality measured under both (no golden queries they can answer)",
        )  # fmt: skip
        if require_no_regression and not verdict.judged:
            raise click.ClickException(
                "no golden query judged both models, so no regression can be ruled out; "
                "add some (`moderation golden add`) or activate without --require-no-regression"
            )
        if require_no_regression and verdict.worse:
            falls = ", ".join(f"{f.modality} recall {f.a:.4f} -> {f.b:.4f}" for f in verdict.worse)
            raise click.ClickException(
                f"not activated: the candidate is worse on the golden set ({falls})"
            )
    with runtime.session() as session:
        model = registry.activate(session, name, actor=cli_actor())
        shown = model.name
    click.echo(f"active model: {shown}")
