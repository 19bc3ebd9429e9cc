"""Judging a candidate model against the active one on the golden set, before it serves:
both measured now, with the same reranker and k, figure by figure. A candidate is worse
where its recall@k falls below the active model's for a modality both were measured on."""

from __future__ import annotations

from dataclasses import dataclass

from moderation.embedding import registry
from moderation.evaluation import service
from moderation.evaluation.runner import evaluate
from moderation.runtime import Runtime

# Recall figures are means of ratios: a smaller difference is rounding, not a regression.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class CandidateVerdict:
    active: service.RunView
    candidate: service.RunView
    figures: list[service.ComparedFigure]  # a: the active model, b: the candidate

    @property
    def worse(self) -> list[service.ComparedFigure]:
        """The candidate's recall figures below the active model's."""
        return [f for f in self.figures if f.measure == "recall" and f.change < -TOLERANCE]

    @property
    def judged(self) -> bool:
        """Whether any modality was measured under both models."""
        return bool(self.figures)


def judge_candidate(runtime: Runtime, candidate: str) -> CandidateVerdict | None:
    """Both models measured now (recorded as runs, trigger `activate`); None when there is
    no active model to judge against, or `candidate` is already it."""
    with runtime.session() as session:
        active = registry.active_model(session)
        active_name = active.name if active is not None else None
        candidate_name = registry.get_model(session, registry.registered_name(candidate)).name
    if active_name is None or active_name == candidate_name:
        return None
    before = evaluate(runtime, model=active_name, trigger="activate")
    after = evaluate(runtime, model=candidate_name, trigger="activate")
    return CandidateVerdict(before, after, service.compare(before, after))
