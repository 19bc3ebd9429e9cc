"""The general index in Milvus: one collection per model, served through an alias.

Each model's vectors live in a collection `<prefix>_m<model id>_<n>`, reached only through
the alias `<prefix>_m<model id>`: a rebuild fills collection n + 1 while searches go to n,
then moves the alias in one call (`switch_alias`), so a search answers from one collection
or the other, never a mix. Rows are keyed by embedding id and carry the upload's filter
fields (`FIELDS`), kept current by `milvus_sync`; filters run inside Milvus.

Index type by size, as on the Faiss side: HNSW up to `search_hnsw_max` vectors, IVF_SQ8
above (IVF_PQ with `search_ivf_pq_m` > 0), the search breadth (ef, nprobe) tuned to the
recall target and stored with the collection's sync state.

A filtered search is two searches (`MilvusIndex.search`): the nearest rows of any kind in a
window wider than asked, of which Milvus keeps those passing the filter, and, only where
too few of the window pass, Milvus's own filtered search. Milvus 2.3.5's filtered HNSW
alone falls short of the recall target where a filter passes between 7% and about 15% of
rows (see `FILTERED_WINDOW`); a window of nearest rows is exact about what it holds.

Every call to the server goes through `Milvus.call`, which turns the client's failures into
`SearchIndexUnavailable` (503): a search says Milvus is away; screening never touches it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from moderation.config import Settings
from moderation.errors import Unavailable
from moderation.search.filters import Filters
from moderation.search.indexes import recall_from_scores
from moderation.search.vector_index import IndexRows, Rescore, smallest_meeting

if TYPE_CHECKING:
    from pymilvus import MilvusClient

logger = logging.getLogger(__name__)

# Milvus refuses a search for more than this many results (topk).
MAX_TOPK = 16_384
# Rows per upsert: 2,000 768-d vectors are 6 MB, well under gRPC's 64 MB message limit.
WRITE_CHUNK = 2_000
# An upload hitting more banks than this keeps the first ones (a bank filter on the others
# then relies on the exact scan); review statuses are four.
MAX_BANKS = 256
# Uploads per query when the sync reads which rows changed uploads hold.
_UPLOADS_PER_QUERY = 500
# Where a filter passes 7% of rows or fewer, Milvus 2.3.5 (knowhere's hnswlib) scans the
# passing rows exactly; above that it searches the HNSW graph, following a neighbour that
# fails the filter only one time in seven (its kAlpha, 0.15). At 8-15% selectivity that
# strands the search among failing rows: measured on 30k clustered 768-d vectors, recall@10
# stays at 0.89-0.95 whatever the ef (128 to 4096), and 2.5% of queries get no result at all
# (docs/milvus.md). The nearest rows of any kind, `FILTERED_WINDOW` times the candidates
# asked for, with the filter applied to them, hold the nearest passing rows as far as the
# window reaches; where fewer than 7% of a window pass, Milvus's filtered search is added
# (likely exact there, `EXACT_FILTER_SHARE`). Tuning measures the smallest multiple that
# meets the recall target (`filtered_window`); 0 turns the window off.
FILTERED_WINDOW = 4
# The share of rows passing a filter at or below which Milvus 2.3.5 scans them exactly
# (knowhere's kHnswSearchKnnBFThreshold, 0.93 filtered out; measured: exact at 5% and 7%).
EXACT_FILTER_SHARE = 0.07
# Tuning tries windows up to this multiple: 16 x 100 candidates reach a filter passing 1 row
# in 160, and below 7% Milvus's filtered search is exact anyway.
_MAX_WINDOW = 16
# Ids per query when Milvus applies a filter to a window's rows: a query returns at most
# 16,384 rows.
_IDS_PER_QUERY = 16_384
# Searches read the collection's size to know when the index is exhausted; a count costs
# a round trip, so it is reused this long.
_SIZE_TTL_S = 1.0

T = TypeVar("T")
# A search result: (score, embedding id, upload id).
_Hit = tuple[float, int, int]


class SearchIndexUnavailable(Unavailable):
    code = "search_index_unavailable"


class NoCollection(SearchIndexUnavailable):
    code = "search_index_not_built"

    def __init__(self, model: str, alias: str) -> None:
        super().__init__(
            f"Milvus has no collection for model {model!r} (alias {alias}) yet: run "
            "`moderation index sync` (or MODERATION_MILVUS_SYNC_IN_API=true)"
        )


@dataclass(frozen=True)
class MilvusSettings:
    uri: str
    token: str | None
    db: str
    timeout_s: float
    consistency: str
    prefix: str
    shards: int

    @classmethod
    def from_settings(cls, settings: Settings) -> MilvusSettings:
        return cls(
            uri=settings.milvus_uri,
            token=settings.milvus_token.get_secret_value() if settings.milvus_token else None,
            db=settings.milvus_db,
            timeout_s=settings.milvus_timeout_s,
            consistency=settings.milvus_consistency,
            prefix=settings.milvus_collection_prefix,
            shards=settings.milvus_shards,
        )

    def alias(self, model_id: int) -> str:
        return f"{self.prefix}_m{model_id}"


class Milvus:
    """One client per process, connected on first use and again after a failure."""

    def __init__(self, settings: MilvusSettings) -> None:
        self.settings = settings
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()

    def _connect(self) -> MilvusClient:
        with self._lock:
            if self._client is None:
                from pymilvus import MilvusClient

                self._client = MilvusClient(
                    uri=self.settings.uri,
                    token=self.settings.token or "",
                    db_name=self.settings.db,
                    timeout=self.settings.timeout_s,
                )
            return self._client

    def call(self, what: str, operation: Callable[[MilvusClient], T]) -> T:
        """`operation` on the client; any failure of the server or the connection is
        `SearchIndexUnavailable`, naming the server and what was being done."""
        from pymilvus.exceptions import MilvusException

        try:
            return operation(self._connect())
        except (MilvusException, ConnectionError, TimeoutError) as error:
            self._drop()
            raise SearchIndexUnavailable(
                f"Milvus at {self.settings.uri} failed to {what}: {_reason(error)}; searches "
                "answer 503 until it returns (screening is unaffected, and the sync resumes "
                "from its checkpoint)",
                backend="milvus",
            ) from error
        except Exception as error:
            # grpc's own errors (a channel that never came up) are not MilvusException.
            if type(error).__module__.startswith("grpc"):
                self._drop()
                raise SearchIndexUnavailable(
                    f"Milvus at {self.settings.uri} failed to {what}: {_reason(error)}",
                    backend="milvus",
                ) from error
            raise

    def _drop(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken channel may itself fail
                logger.debug("closing the Milvus client failed", exc_info=True)


def _nearest(hits: list[_Hit], limit: int) -> list[_Hit]:
    """The best `limit` of hits from two searches, each embedding once."""
    best: dict[int, _Hit] = {}
    for hit in hits:
        best.setdefault(hit[1], hit)
    return sorted(best.values(), key=lambda hit: (-hit[0], hit[1]))[:limit]


def _reason(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error)
    return " ".join(str(message).split())[:300]


@dataclass(frozen=True)
class MilvusPlan:
    """Which index a new collection gets, by the corpus size it is built for."""

    hnsw_max: int
    hnsw_m: int
    hnsw_ef_construction: int
    ivf_nlist: int | None
    ivf_pq_m: int

    @classmethod
    def from_settings(cls, settings: Settings) -> MilvusPlan:
        return cls(
            hnsw_max=settings.search_hnsw_max,
            hnsw_m=settings.search_hnsw_m,
            hnsw_ef_construction=settings.search_hnsw_ef_construction,
            ivf_nlist=settings.search_ivf_nlist,
            ivf_pq_m=settings.search_ivf_pq_m,
        )

    def index_for(self, size: int, dim: int) -> dict[str, Any]:
        """Index type and build parameters for a collection of about `size` vectors."""
        if size < self.hnsw_max:
            return {
                "index_type": "HNSW",
                "params": {"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction},
            }
        nlist = min(65_536, self.ivf_nlist or int(4 * math.sqrt(size)))
        if self.ivf_pq_m > 0 and dim % self.ivf_pq_m == 0:
            return {"index_type": "IVF_PQ", "params": {"nlist": nlist, "m": self.ivf_pq_m}}
        return {"index_type": "IVF_SQ8", "params": {"nlist": nlist}}


def _schema(client: MilvusClient, dim: int) -> Any:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)  # embeddings.id
    schema.add_field("upload_id", DataType.INT64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    # The filter fields (filters.Filters.milvus_expression), from `uploads` and `hits`.
    schema.add_field("finished_at", DataType.INT64)  # µs since 1970; filters.NO_TIME if none
    schema.add_field("status", DataType.VARCHAR, max_length=32)
    schema.add_field("error_code", DataType.VARCHAR, max_length=64)
    schema.add_field("has_hit", DataType.BOOL)
    schema.add_field(
        "banks",
        DataType.ARRAY,
        element_type=DataType.VARCHAR,
        max_capacity=MAX_BANKS,
        max_length=200,
    )
    schema.add_field(
        "review_statuses",
        DataType.ARRAY,
        element_type=DataType.VARCHAR,
        max_capacity=8,
        max_length=16,
    )
    return schema


def create_collection(milvus: Milvus, name: str, dim: int, index: dict[str, Any]) -> None:
    """An empty, loaded collection with the vector index `index` (`MilvusPlan.index_for`)."""

    def create(client: MilvusClient) -> None:
        params = client.prepare_index_params()
        params.add_index(
            field_name="vector",
            index_type=index["index_type"],
            metric_type="IP",
            params=index["params"],
        )
        client.create_collection(
            name,
            schema=_schema(client, dim),
            index_params=params,
            consistency_level=milvus.settings.consistency,
            num_shards=milvus.settings.shards,
        )

    milvus.call(f"create collection {name}", create)


def serving_collection(milvus: Milvus, alias: str) -> str | None:
    """The collection the alias points at, or None when there is no such alias."""

    def describe(client: MilvusClient) -> str | None:
        if alias not in client.list_aliases().get("aliases", []):
            return None
        return str(client.describe_alias(alias)["collection_name"])

    return milvus.call(f"describe alias {alias}", describe)


def switch_alias(milvus: Milvus, alias: str, collection: str) -> str | None:
    """Point the alias at `collection` in one call (creating it the first time); the
    collection it pointed at before, if any. Searches in flight finish on the old one."""

    def switch(client: MilvusClient) -> str | None:
        aliases = client.list_aliases().get("aliases", [])
        if alias not in aliases:
            client.create_alias(collection, alias)
            return None
        before = str(client.describe_alias(alias)["collection_name"])
        client.alter_alias(collection, alias)
        return before

    return milvus.call(f"move alias {alias} to {collection}", switch)


def next_collection_name(milvus: Milvus, alias: str) -> str:
    """`<alias>_<n>`, n one above every collection of the alias that exists."""

    def numbers(client: MilvusClient) -> list[int]:
        names = client.list_collections()
        return [
            int(name.rsplit("_", 1)[1])
            for name in names
            if name.startswith(alias + "_") and name.rsplit("_", 1)[1].isdigit()
        ]

    taken = milvus.call("list collections", numbers)
    return f"{alias}_{max(taken, default=0) + 1}"


def load_collection(milvus: Milvus, name: str) -> None:
    """Load it into the query nodes' memory (at once when it already is)."""
    milvus.call(f"load collection {name}", lambda client: client.load_collection(name))


def drop_collection(milvus: Milvus, name: str) -> None:
    milvus.call(f"drop collection {name}", lambda client: client.drop_collection(name))


def upsert_rows(milvus: Milvus, collection: str, rows: list[dict[str, Any]]) -> int:
    """Write rows (dicts of `_schema`'s fields) in chunks; idempotent by embedding id."""
    for start in range(0, len(rows), WRITE_CHUNK):
        chunk = rows[start : start + WRITE_CHUNK]
        milvus.call(
            f"write {len(chunk)} rows to {collection}",
            lambda client, chunk=chunk: client.upsert(collection, chunk),  # type: ignore[misc]
        )
    return len(rows)


def delete_ids(milvus: Milvus, collection: str, embedding_ids: list[int]) -> int:
    if embedding_ids:
        milvus.call(
            f"delete {len(embedding_ids)} rows from {collection}",
            lambda client: client.delete(collection, ids=embedding_ids),
        )
    return len(embedding_ids)


def ids_of_uploads(milvus: Milvus, collection: str, upload_ids: list[int]) -> list[tuple[int, int]]:
    """(embedding id, upload id) of every row of these uploads the collection holds."""
    if not upload_ids:
        return []

    def query(client: MilvusClient) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        # In chunks: a query returns at most 16,384 rows, and its expression stays short.
        for start in range(0, len(upload_ids), _UPLOADS_PER_QUERY):
            chunk = upload_ids[start : start + _UPLOADS_PER_QUERY]
            rows = client.query(
                collection,
                filter=f"upload_id in {chunk}",
                output_fields=["id", "upload_id"],
                consistency_level="Strong",  # a sync must see its own writes
            )
            found.extend((int(row["id"]), int(row["upload_id"])) for row in rows)
        return found

    return milvus.call(f"read rows of {len(upload_ids)} uploads", query)


def count_rows(milvus: Milvus, collection: str, consistency: str | None = None) -> int:
    def count(client: MilvusClient) -> int:
        kwargs = {"consistency_level": consistency} if consistency else {}
        result = client.query(collection, filter="", output_fields=["count(*)"], **kwargs)
        return int(result[0]["count(*)"])

    return milvus.call(f"count {collection}", count)


class MilvusIndex:
    """A model's collection, read through its alias: the Milvus `VectorIndex`. Writes go
    through `milvus_sync`, which owns the checkpoints; `upsert` and `delete` here write
    rows without filter fields' upkeep and serve tests and tools."""

    def __init__(
        self,
        milvus: Milvus,
        *,
        model_id: int,
        model_name: str,
        dim: int,
        parameters: dict[str, Any],
        checkpoint: int = 0,
    ) -> None:
        self.milvus = milvus
        self.model_id = model_id
        self.model_name = model_name
        self.dim = dim
        self.alias = milvus.settings.alias(model_id)
        self._parameters = dict(parameters)
        self.checkpoint = checkpoint
        self._size: tuple[float, int] | None = None

    @property
    def size(self) -> int:
        now = time.monotonic()
        if self._size is None or now - self._size[0] > _SIZE_TTL_S:
            self._size = (now, count_rows(self.milvus, self.alias))
        return self._size[1]

    @property
    def kind(self) -> str:
        return str(self._parameters.get("index_type", "HNSW")).lower()

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self._parameters)

    @property
    def filters_inside(self) -> bool:
        return True

    @property
    def max_breadth(self) -> int:
        return MAX_TOPK

    def _breadth(self, limit: int, widen: int) -> dict[str, Any]:
        """The tuned ef or nprobe, times `widen`."""
        name = "ef" if self.kind == "hnsw" else "nprobe"
        value = int(self._parameters.get(name, 64 if name == "ef" else 16))
        if name == "ef":
            return {"ef": min(max(value * widen, limit), 32_768)}  # limit <= ef <= 32768
        nlist = int(self._parameters.get("params", {}).get("nlist", 1))
        return {"nprobe": min(nlist, value * widen)}

    def search(
        self,
        queries: np.ndarray,
        breadth: int,
        *,
        widen: int = 1,
        filters: Filters | None = None,
        search_params: dict[str, Any] | None = None,
        expression: str = "",
        window: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`VectorIndex.search`; `search_params`, a raw `expression` and the filtered
        `window` multiple (default: the tuned `filtered_window`) serve tuning."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        limit = max(1, min(breadth, MAX_TOPK))
        if filters is not None:
            expression = filters.milvus_expression()
        params = search_params or self._breadth(limit, widen)
        if window is None:
            window = int(self._parameters.get("filtered_window", FILTERED_WINDOW))
        if expression and window > 0:
            found, shares = self._window_search(queries, limit, widen, expression, window)
            # Where few of the window pass, Milvus's own filtered search is likely exact
            # (the filter passes under 7% of rows): merge its results in.
            sparse = [
                row
                for row, hits in enumerate(found)
                if len(hits) < limit and shares[row] < EXACT_FILTER_SHARE
            ]
            if sparse:
                inside = self._search(queries[sparse], limit, expression, params)
                for row, hits in zip(sparse, inside, strict=True):
                    found[row] = _nearest(found[row] + hits, limit)
        else:
            found = self._search(queries, limit, expression, params)
        scores = np.full((len(queries), limit), -np.inf, dtype=np.float32)
        embedding_ids = np.full((len(queries), limit), -1, dtype=np.int64)
        upload_ids = np.full((len(queries), limit), -1, dtype=np.int64)
        for row, hits in enumerate(found):
            for slot, (score, embedding_id, upload_id) in enumerate(hits):
                scores[row, slot] = score
                embedding_ids[row, slot] = embedding_id
                upload_ids[row, slot] = upload_id
        return scores, embedding_ids, upload_ids

    def _search(
        self,
        queries: np.ndarray,
        limit: int,
        expression: str,
        params: dict[str, Any],
        output_fields: tuple[str, ...] = ("upload_id",),
    ) -> list[list[_Hit]]:
        """One Milvus search: per query, (score, embedding id, upload id), best first (-1
        for the upload without `output_fields`)."""

        def run(client: MilvusClient) -> Any:
            return client.search(
                self.alias,
                data=queries.tolist(),
                limit=limit,
                filter=expression,
                output_fields=list(output_fields),
                search_params={"metric_type": "IP", "params": params},
            )

        hits = self.milvus.call(f"search {self.alias}", run)
        return [
            [
                (
                    float(hit["distance"]),
                    int(hit["id"]),
                    int(hit["entity"]["upload_id"]) if output_fields else -1,
                )
                for hit in row
            ]
            for row in hits
        ]

    def _window_search(
        self, queries: np.ndarray, limit: int, widen: int, expression: str, multiple: int
    ) -> tuple[list[list[_Hit]], list[float]]:
        """The nearest rows of any kind, `multiple` x `widen` times `limit` of them, and of
        those the ones passing `expression` (Milvus applies it to their ids), up to `limit`
        per query: exactly the nearest passing rows, as far as the window reaches. With the
        share of each query's window that passes."""
        size = min(MAX_TOPK, limit * multiple * widen)
        # Without output fields: the upload ids come with the passing rows, which are fewer.
        window = self._search(queries, size, "", self._breadth(size, widen), output_fields=())
        ids = sorted({hit[1] for hits in window for hit in hits})

        def passing(client: MilvusClient) -> dict[int, int]:
            uploads: dict[int, int] = {}
            for start in range(0, len(ids), _IDS_PER_QUERY):
                chunk = ids[start : start + _IDS_PER_QUERY]
                rows = client.query(
                    self.alias,
                    filter=f"id in {chunk} and ({expression})",
                    output_fields=["id", "upload_id"],
                )
                uploads.update((int(row["id"]), int(row["upload_id"])) for row in rows)
            return uploads

        uploads = self.milvus.call(f"filter a window of {self.alias}", passing) if ids else {}
        found, shares = [], []
        for hits in window:
            kept = [(score, id_, uploads[id_]) for score, id_, _ in hits if id_ in uploads]
            found.append(kept[:limit])
            shares.append(len(kept) / len(hits) if hits else 0.0)
        return found, shares

    def upsert(self, rows: IndexRows) -> int:
        from moderation.search.filters import NO_TIME

        return upsert_rows(
            self.milvus,
            self.alias,
            [
                {
                    "id": int(embedding_id),
                    "upload_id": int(upload_id),
                    "vector": vector.tolist(),
                    "finished_at": NO_TIME,
                    "status": "",
                    "error_code": "",
                    "has_hit": False,
                    "banks": [],
                    "review_statuses": [],
                }
                for embedding_id, upload_id, vector in zip(
                    rows.embedding_ids, rows.upload_ids, rows.vectors, strict=True
                )
            ],
        )

    def delete(self, embedding_ids: np.ndarray) -> int:
        return delete_ids(self.milvus, self.alias, [int(i) for i in embedding_ids])

    def held_ids(self) -> np.ndarray:
        def query(client: MilvusClient) -> list[int]:
            ids: list[int] = []
            iterator = client.query_iterator(
                self.alias, batch_size=MAX_TOPK, filter="id >= 0", output_fields=["id"]
            )
            while batch := iterator.next():
                ids.extend(int(row["id"]) for row in batch)
            iterator.close()
            return ids

        return np.array(sorted(self.milvus.call(f"read ids of {self.alias}", query)), np.int64)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "milvus",
            "uri": self.milvus.settings.uri,
            "model": self.model_name,
            "alias": self.alias,
            "collection": serving_collection(self.milvus, self.alias),
            "kind": self.kind,
            "size": self.size,
            "parameters": self.parameters,
            "checkpoint": self.checkpoint,
        }

    def tune_filtered(
        self,
        queries: np.ndarray,
        exact_scores: np.ndarray,
        rescore: Rescore,
        *,
        expression: str,
        label: str,
        target: float,
        k: int,
        candidates: int,
    ) -> float:
        """Measure recall@k under a filter passing a known share of rows (`label`), as
        filtered searches are served, with windows of 0 (Milvus's filtered search alone),
        1, 2, 4... times the candidates; keep the smallest multiple that meets `target` as
        `filtered_window` (the largest over the filters measured), or the widest measured
        where none does. The recall reached is kept as `filtered_recall_<label>`."""
        width = min(max(k, candidates), MAX_TOPK)
        multiples = [0, 1]
        while width * multiples[-1] * 2 <= MAX_TOPK and multiples[-1] < _MAX_WINDOW:
            multiples.append(multiples[-1] * 2)

        def recall_with(multiple: int) -> float:
            _, ids, _ = self.search(queries, width, expression=expression, window=multiple)
            return recall_from_scores(-np.sort(-rescore(ids, queries), axis=1)[:, :k], exact_scores)

        chosen, recall = smallest_meeting(multiples, recall_with, target)
        previous = int(self._parameters.get("filtered_window", 0))
        self._parameters |= {
            "filtered_window": max(previous, chosen),
            f"filtered_recall_{label}": round(recall, 4),
        }
        if recall < target:
            logger.warning(
                "Milvus %s reaches recall@%d %.3f at most at %s selectivity (window %d x %d), "
                "below the target %.2f",
                self.kind,
                k,
                recall,
                label,
                chosen,
                width,
                target,
            )
        return recall

    def tune(
        self,
        queries: np.ndarray,
        exact_scores: np.ndarray,
        rescore: Rescore,
        *,
        target: float,
        k: int,
        candidates: int,
    ) -> float:
        """The smallest ef (HNSW) or nprobe (IVF) whose served recall@k meets `target`;
        stored in `parameters` (the caller persists them with the sync state)."""
        width = min(max(k, candidates), MAX_TOPK)
        hnsw = self.kind == "hnsw"
        name = "ef" if hnsw else "nprobe"

        def recall_with(value: int) -> float:
            _, ids, _ = self.search(queries, width, search_params={name: value})
            return recall_from_scores(-np.sort(-rescore(ids, queries), axis=1)[:, :k], exact_scores)

        if hnsw:
            values = [width]
            while values[-1] < 4096:
                values.append(values[-1] * 2)
        else:
            nlist = int(self._parameters.get("params", {}).get("nlist", 1))
            values = [1]
            while values[-1] < nlist:
                values.append(min(nlist, values[-1] * 2))
        chosen, recall = smallest_meeting(values, recall_with, target)
        self._parameters |= {name: chosen, "tuned_recall": round(recall, 4), "tuned_k": k}
        if recall < target:
            logger.warning(
                "Milvus %s reaches recall@%d %.3f at most (%s=%d), below the target %.2f",
                self.kind,
                k,
                recall,
                name,
                chosen,
                target,
            )
        return recall
