"""The analysts' picture of the embedding space: a sample of the corpus in two dimensions,
coloured by bank hit, so that clusters of known-bad content and what sits near them show.

PCA (scikit-learn), not UMAP: it is linear, so a point's place on the map is a fixed
function of its embedding (a cluster drawn apart is apart in the embedding, and the map of
the same sample is the same map tomorrow); it takes milliseconds for 10,000 x 768 where
UMAP takes tens of seconds on two cores; and it needs no numba/llvmlite build. UMAP draws
tighter clusters; the price is a picture whose distances mean little and that changes
with its random seed.

`render_map` is a pure function of vectors and labels; `sample_corpus` reads the sample
for one model from PostgreSQL.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from sqlalchemy import Text, cast, func, select
from sqlalchemy.orm import Session

from moderation.banks.models import Bank, BankEntry
from moderation.embedding.models import Embedding, EmbeddingModel
from moderation.embedding.service import vector_from_bytes
from moderation.errors import NotFound
from moderation.review.models import Hit, ReviewStatus

NO_HIT = "no hit"
# Pixels of the PNG: large enough to read a legend of a dozen banks, small enough to mail.
WIDTH_PX, HEIGHT_PX, DPI = 1200, 900, 100
# Rows fetched per query when reading the sample's vectors.
FETCH_CHUNK = 5_000


class NothingToMap(NotFound):
    """The model has no stored embeddings (or is not registered)."""

    code = "nothing_to_map"


@dataclass(frozen=True)
class CorpusSample:
    upload_ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    # NO_HIT, or the names of the banks the upload hit, joined by " + ".
    labels: list[str]
    corpus_size: int
    # Where each upload's hits stand in review (`review_state`); NO_HIT for none.
    statuses: list[str]


@dataclass(frozen=True)
class Projection:
    points: npt.NDArray[np.float32]  # (n, 2)
    explained: tuple[float, float]  # the share of the variance along each axis


def project(vectors: npt.NDArray[np.float32]) -> Projection:
    """The first two principal components of the vectors."""
    from sklearn.decomposition import PCA

    if len(vectors) < 2:
        raise NothingToMap("a map needs at least two embeddings")
    pca = PCA(n_components=2, svd_solver="full", random_state=0)
    points = pca.fit_transform(np.asarray(vectors, dtype=np.float32)).astype(np.float32)
    ratio = pca.explained_variance_ratio_
    return Projection(points, (float(ratio[0]), float(ratio[1])))


def render_map(
    vectors: npt.NDArray[np.float32], labels: list[str], out: Path | BinaryIO, title: str = ""
) -> Projection:
    """Project the vectors and draw them, one colour per label, to a PNG at `out` (a path,
    or a binary stream: the review app's map page serves it without a file).

    Uploads without a hit are drawn first, small and grey, so that every hit stays visible
    on top of them; each bank (or combination of banks) gets its own colour, in the
    order of its count, with the count in the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(labels) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(labels)} labels")
    projection = project(vectors)
    counts = Counter(labels)
    banks = sorted((label for label in counts if label != NO_HIT), key=lambda b: (-counts[b], b))
    palette = plt.get_cmap("tab10" if len(banks) <= 10 else "tab20")
    names = np.asarray(labels)
    figure, axis = plt.subplots(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
    if NO_HIT in counts:
        rows = projection.points[names == NO_HIT]
        axis.scatter(
            rows[:, 0],
            rows[:, 1],
            s=4,
            color="#b0b0b0",
            alpha=0.5,
            linewidths=0,
            label=f"{NO_HIT} ({counts[NO_HIT]})",
        )
    for i, bank in enumerate(banks):
        rows = projection.points[names == bank]
        axis.scatter(
            rows[:, 0],
            rows[:, 1],
            s=22,
            color=palette(i % palette.N),
            edgecolors="black",
            linewidths=0.3,
            label=f"{bank} ({counts[bank]})",
        )
    axis.set_xlabel(f"PC1 ({projection.explained[0]:.0%} of variance)")
    axis.set_ylabel(f"PC2 ({projection.explained[1]:.0%} of variance)")
    axis.set_title(title or f"{len(vectors)} embeddings, PCA")
    axis.grid(True, alpha=0.25)
    axis.legend(loc="best", fontsize=9, markerscale=1.5, title="bank hit")
    if isinstance(out, Path):
        out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI, format="png")
    plt.close(figure)
    return projection


def sample_corpus(session: Session, model_name: str, sample: int, seed: int = 0) -> CorpusSample:
    """Up to `sample` uploads' embeddings (frame 0) for one model, with their bank hits.

    Hits are rare, so a uniform sample would show almost none: every upload with a hit is
    taken (up to half the sample, chosen at random beyond that), and the rest of the sample
    is drawn uniformly from the uploads without one. Only ids are read for the whole
    corpus; vectors only for the sample.
    """
    model_id = session.scalar(select(EmbeddingModel.id).where(EmbeddingModel.name == model_name))
    if model_id is None:
        known = session.scalars(select(EmbeddingModel.name).order_by(EmbeddingModel.name)).all()
        raise NothingToMap(
            f"no embeddings for model {model_name!r}; models in the database: "
            + (", ".join(known) or "none")
        )
    rows = session.execute(
        select(Embedding.id, Embedding.upload_id)
        .where(Embedding.model_id == model_id, Embedding.frame_index == 0)
        .order_by(Embedding.id)
    ).all()
    if not rows:
        raise NothingToMap(f"model {model_name!r} has no stored embeddings")
    embedding_ids = np.fromiter((row[0] for row in rows), np.int64, len(rows))
    upload_ids = np.fromiter((row[1] for row in rows), np.int64, len(rows))
    hit_banks = _banks_hit(session)
    has_hit = np.isin(upload_ids, np.fromiter(hit_banks, np.int64, len(hit_banks)))

    rng = np.random.default_rng(seed)
    hit_rows = np.flatnonzero(has_hit)
    other_rows = np.flatnonzero(~has_hit)
    take_hits = min(len(hit_rows), sample // 2) if len(other_rows) else min(len(hit_rows), sample)
    chosen = np.concatenate(
        [
            rng.choice(hit_rows, take_hits, replace=False),
            rng.choice(other_rows, min(len(other_rows), sample - take_hits), replace=False),
        ]
    ).astype(np.int64)
    chosen.sort()

    wanted = embedding_ids[chosen]
    vectors_by_id: dict[int, bytes] = {}
    for start in range(0, len(wanted), FETCH_CHUNK):
        chunk = wanted[start : start + FETCH_CHUNK].tolist()
        for embedding_id, vector in session.execute(
            select(Embedding.id, Embedding.vector).where(Embedding.id.in_(chunk))
        ):
            vectors_by_id[embedding_id] = vector
    vectors = np.stack([vector_from_bytes(vectors_by_id[int(i)]) for i in wanted]).astype(
        np.float32
    )
    labels = [" + ".join(hit_banks.get(int(u), [NO_HIT])) for u in upload_ids[chosen]]
    states = _review_states(session, upload_ids[chosen][has_hit[chosen]].tolist())
    statuses = [states.get(int(u), NO_HIT) for u in upload_ids[chosen]]
    return CorpusSample(upload_ids[chosen], vectors, labels, len(rows), statuses)


# An upload's hits in review, summed up by the one that needs a person most: any pending
# hit makes the upload pending, then escalated, confirmed, dismissed.
_STATE_ORDER = [
    ReviewStatus.PENDING,
    ReviewStatus.ESCALATED,
    ReviewStatus.CONFIRMED,
    ReviewStatus.DISMISSED,
]


def _review_states(session: Session, upload_ids: list[int]) -> dict[int, str]:
    """Upload id -> where its hits stand in review, for uploads with hits."""
    states: dict[int, str] = {}
    for start in range(0, len(upload_ids), FETCH_CHUNK):
        chunk = upload_ids[start : start + FETCH_CHUNK]
        for upload_id, found in session.execute(
            select(Hit.upload_id, func.array_agg(func.distinct(cast(Hit.review_status, Text))))
            .where(Hit.upload_id.in_(chunk))
            .group_by(Hit.upload_id)
        ):
            present = {ReviewStatus(value) for value in found}
            states[upload_id] = next(state for state in _STATE_ORDER if state in present).value
    return states


def _banks_hit(session: Session) -> dict[int, list[str]]:
    """Upload id -> the sorted names of the banks it hit, on any signal."""
    rows = session.execute(
        select(Hit.upload_id, func.array_agg(func.distinct(Bank.name)))
        .join(BankEntry, BankEntry.id == Hit.bank_entry_id)
        .join(Bank, Bank.id == BankEntry.bank_id)
        .group_by(Hit.upload_id)
    ).all()
    return {upload_id: sorted(names) for upload_id, names in rows}
