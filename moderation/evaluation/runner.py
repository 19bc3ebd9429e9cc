"""A run on the golden set from outside a request: the model's index opened (with every
committed embedding), its text tower and image intake for the queries, the
reranker by name; one transaction records the run."""

from __future__ import annotations

from moderation.evaluation import service
from moderation.runtime import Runtime
from moderation.search.rerank import Reranker
from moderation.search.rerankers import reranker_named
from moderation.search.runtime import SearchRuntime


def evaluate(
    runtime: Runtime,
    *,
    model: str | None = None,
    reranker: str | None = None,
    trigger: str = "cli",
    k: int | None = None,
    custom_reranker: Reranker | None = None,
) -> service.RunView:
    """Measure `model` (default: the active one) with `reranker` (default: the setting);
    `custom_reranker` measures any `Reranker` under the name `reranker`."""
    settings = runtime.settings
    searches = SearchRuntime(runtime, follow=False, model=model)
    try:
        # Opening reads every committed embedding (rows above the checkpoint included).
        index = searches.index()
        name = reranker or settings.search_reranker
        make = service.QueryMaker(
            text=searches.text_query,
            image_uri=lambda uri: searches.fetched_image_query(uri, operator_file=False),
        )
        with runtime.session() as session:
            evaluation = service.run(
                session,
                index,
                make,
                reranker=custom_reranker
                or reranker_named(name, session, settings, limits=searches.limits),
                reranker_name=name,
                k=k or settings.eval_k,
                candidates=settings.search_candidates,
                exact_scan_max=settings.search_exact_scan_max,
                trigger=trigger,
                drop_margin=settings.eval_drop_margin,
            )
            run_id = evaluation.id
        with runtime.session() as session:
            return service.run_view(session, run_id)
    finally:
        searches.close()
