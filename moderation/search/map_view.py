"""The embedding map as a page draws it: each sampled upload a point in the page's own
coordinates, coloured by the banks it hit and marked by where its hits stand in review.

A pure function of a `CorpusSample`, so the page, its legend and its tests agree on one
layout. The colours are matplotlib's tab10 (then tab20), in the order of each bank's
count, as `moderation index map` draws them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from moderation.search.projection import NO_HIT, CorpusSample, project

# tab10, then tab20's lighter shades: distinct for a dozen banks or so, then repeating.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip
NO_HIT_COLOUR = "#b0b0b0"
WIDTH, HEIGHT, MARGIN = 1000, 700, 20


@dataclass(frozen=True)
class MapPoint:
    upload_id: int
    x: float
    y: float
    label: str
    status: str
    colour: str


@dataclass(frozen=True)
class LegendEntry:
    label: str
    colour: str
    count: int


@dataclass(frozen=True)
class MapView:
    points: list[MapPoint]  # uploads without a hit first, so hits are drawn on top
    legend: list[LegendEntry]
    explained: tuple[float, float]
    width: int = WIDTH
    height: int = HEIGHT


def map_view(sample: CorpusSample) -> MapView:
    projection = project(sample.vectors)
    counts = Counter(sample.labels)
    banks = sorted((label for label in counts if label != NO_HIT), key=lambda b: (-counts[b], b))
    colours = {bank: PALETTE[i % len(PALETTE)] for i, bank in enumerate(banks)}
    colours[NO_HIT] = NO_HIT_COLOUR
    points = projection.points.astype(np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    # PC1 across, PC2 up: the page's y grows downwards.
    xs = MARGIN + (points[:, 0] - low[0]) / span[0] * (WIDTH - 2 * MARGIN)
    ys = HEIGHT - MARGIN - (points[:, 1] - low[1]) / span[1] * (HEIGHT - 2 * MARGIN)
    drawn = [
        MapPoint(
            upload_id=int(upload_id),
            x=round(float(x), 1),
            y=round(float(y), 1),
            label=label,
            status=status,
            colour=colours[label],
        )
        for upload_id, x, y, label, status in zip(
            sample.upload_ids, xs, ys, sample.labels, sample.statuses, strict=True
        )
    ]
    drawn.sort(key=lambda point: point.label != NO_HIT)
    legend = [LegendEntry(bank, colours[bank], counts[bank]) for bank in banks]
    if NO_HIT in counts:
        legend.append(LegendEntry(NO_HIT, NO_HIT_COLOUR, counts[NO_HIT]))
    return MapView(drawn, legend, projection.explained)
