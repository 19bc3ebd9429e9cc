"""The analysts' retrieval-quality page: recall on the golden set by run, per modality, as
a chart drawn on the server (SVG, no script) beside the table of runs
(`moderation eval history` on the command line)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from moderation.auth.models import Role
from moderation.evaluation import service
from moderation.evaluation.models import Modality
from moderation.http.access import AppRuntime, allow
from moderation.web.rendering import render

router = APIRouter(tags=["pages"], include_in_schema=False)
ANALYSTS = allow(Role.ANALYST, Role.REVIEWER)
RUNS_SHOWN = 60
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 900, 300, 50, 20, 15, 30
COLOURS = {Modality.TEXT.value: "#1f77b4", Modality.IMAGE.value: "#d62728"}


@dataclass(frozen=True)
class ChartPoint:
    x: float
    y: float
    run: service.RunView
    modality: str
    recall: float


@dataclass(frozen=True)
class Series:
    modality: str
    colour: str
    points: list[ChartPoint]

    @property
    def path(self) -> str:
        return " ".join(
            f"{'M' if i == 0 else 'L'}{p.x:.1f},{p.y:.1f}" for i, p in enumerate(self.points)
        )


def recall_chart(runs: list[service.RunView]) -> list[Series]:
    """Each modality's recall@k by run, oldest on the left, in the chart's coordinates."""
    step = (WIDTH - LEFT - RIGHT) / max(1, len(runs) - 1)
    series = []
    for modality, colour in COLOURS.items():
        points = [
            ChartPoint(
                x=LEFT + i * step,
                y=TOP + (1 - figures["recall"]) * (HEIGHT - TOP - BOTTOM),
                run=run,
                modality=modality,
                recall=figures["recall"],
            )
            for i, run in enumerate(runs)
            if (figures := run.figures.get(modality)) and figures["queries"]
        ]
        if points:
            series.append(Series(modality, colour, points))
    return series


@router.get("/search/quality", openapi_extra=ANALYSTS)
def quality_page(request: Request, runtime: AppRuntime) -> HTMLResponse:
    with runtime.session() as session:
        runs = service.history(session, limit=RUNS_SHOWN)
    context = {
        "runs": runs,
        "series": recall_chart(runs),
        "chart": {"width": WIDTH, "height": HEIGHT, "left": LEFT, "right": RIGHT, "top": TOP,
                  "bottom": BOTTOM},
        "ticks": [0.0, 0.25, 0.5, 0.75, 1.0],
    }  # fmt: skip
    return render(request, "quality.html", context)
