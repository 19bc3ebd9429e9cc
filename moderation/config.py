"""One settings object for the whole service, read from `MODERATION_*` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The production checkpoint on a GPU, and the smaller one that is still usable on a CPU.
DEFAULT_CUDA_MODEL = "openai/clip-vit-large-patch14-336"
DEFAULT_CPU_MODEL = "openai/clip-vit-base-patch32"


ENV_PREFIX = "MODERATION_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Connections per process; worker threads share them (each holds one only briefly).
    db_pool_size: int = Field(default=10, ge=1)

    # Embedding model: a Hugging Face CLIP id or a local directory. Unset means the default
    # for the device the worker ends up on (see `resolved_model`).
    model: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Images per forward pass; unset means 128 on CUDA and 8 on CPU.
    batch_size: int | None = Field(default=None, ge=1)
    # Forward passes run at once, each on its own thread. On CPU, one single-threaded stream
    # per core beats one stream spread over all cores (measured on ViT-B/32, 2 cores: 14.4
    # against 12.0 images/s) and suffers far less when decoding competes for the cores. On
    # CUDA each stream is a CUDA stream of its own (`embedding.feeder`): one batch's copy to
    # the device and normalisation overlap the other's forward pass (measured on an H100
    # with one stream: the service's embedder reached 836-859 images/s where the model on
    # inputs already on the GPU reached 933; two streams are not yet measured there).
    # Unset means 2 on CUDA and one per core, at most 4, on CPU.
    inference_streams: int | None = Field(default=None, ge=1)
    # torch.compile the image tower (for a few batch shapes, at worker start). Unset: on
    # CUDA, where it was measured faster (see `ClipEmbedder.compile`), and off on CPU.
    compile_model: bool | None = None
    # How long a stream waits for more images before running a partial batch. A forward
    # pass costs the worker's interpreter a fixed amount besides its images (the tiny CLIP
    # on CPU: 0.85 ms a call and 0.06 an image), which competes with intake for the cores:
    # on two cores with the tiny model, 10 ms gave forward passes of 3 images and the
    # worker 2.2 ms of CPU per upload; 25 ms gave 6.6 images and 1.6-1.85 ms, for 8 ms more
    # per upload in this stage. A model that is the bottleneck finds full batches waiting.
    batch_wait_ms: float = Field(default=25.0, ge=0)

    # Workers and search processes read the model registry this often, so an added,
    # activated or retired model is followed within it (plus a new model's load time).
    model_poll_s: float = Field(default=2.0, gt=0)

    # Matching thresholds. Cosine distance for CLIP (a bank may override it); Hamming bits for PDQ.
    match_radius: float = Field(default=0.05, ge=0, le=2)
    pdq_threshold: int = Field(default=31, ge=0, le=256)
    # PDQ hashes of flat, featureless frames are noise; below this quality they are not matched.
    pdq_min_quality: int = Field(default=50, ge=0, le=100)
    # CLIP bank matching is exact whichever way candidates are found; which way is fastest
    # depends on the machine, the batch and the bank (moderation/banks/clip_plan.py). These
    # candidate methods (moderation/banks/clip_methods.py), separated by commas, are
    # measured at a worker's first start on a machine and chosen from per batch and bank
    # size; empty: every method the machine has instructions for; one name: that method,
    # unmeasured. A half-precision method keeps a copy of the bank (2 bytes a value: 1.5 GB
    # for a million 768-d entries, beside the 3 GB of float32 rows): leave out
    # torch-float16 and torch-bfloat16 where memory is short.
    clip_match_methods: Annotated[list[str], NoDecode] = []
    # Where the measurement is kept, per machine (unset: moderation/clip-match-plan.json
    # under $XDG_CACHE_HOME, or ~/.cache).
    clip_plan_cache: Path | None = None
    # Running workers re-check the banks at most this often, so changes land within it.
    bank_refresh_s: float = Field(default=5.0, ge=0)
    # Workers' sweepers delete bank change log rows older than this. A worker whose
    # checkpoint falls further behind (a long transaction on the server held it back that
    # long) loads the banks whole instead of missing what was deleted.
    bank_changes_retention_s: float = Field(default=24 * 3600.0, gt=0)

    # Where uploads may be fetched from: URI prefixes, separated by commas. `file://` and
    # plain paths only under a listed `file:///dir/` (after resolving symlinks and `..`);
    # `http(s)://` only to public addresses, whatever the prefix (see `images/uri_policy`).
    allowed_uri_prefixes: Annotated[list[str], NoDecode] = ["https://", "http://"]
    # Private networks that fetching may reach after all (an internal object store), as
    # CIDRs separated by commas. Empty: only public addresses are ever fetched.
    fetch_allowed_networks: Annotated[list[str], NoDecode] = []
    max_redirects: int = Field(default=5, ge=0)

    # Intake limits. The fetch timeout bounds the whole fetch (connect, redirects, body, or
    # a local read), not each network operation.
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    max_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=50_000_000, gt=0)
    max_side: int = Field(default=16_384, gt=0)
    max_aspect_ratio: float = Field(default=50.0, ge=1)
    # Animated images: how many frames are screened, and how many pixels may be decoded in all
    # to reach them (later frames are skipped when a long animation would exceed it).
    max_frames: int = Field(default=4, ge=1)
    max_animation_pixels: int = Field(default=200_000_000, gt=0)
    # PDQ hashes at most this many frames of an animation, spread evenly; the upload records
    # how many it hashed. Frames past `max_animation_frames` are not read at all.
    max_hashed_frames: int = Field(default=64, ge=1)
    max_animation_frames: int = Field(default=10_000, ge=1)
    # Decoded pixels a worker holds at once, over all its task threads (estimated peaks).
    decode_memory_mb: int = Field(default=2048, gt=0)
    # The same for an API process (thumbnails, searches by example image, bank entries
    # added from an image), with at most `api_decodes` decoding at once: six requests for
    # one small WebP that declares 16383x3000 pixels would otherwise hold about 3.5 GiB.
    # A decode larger than the whole budget runs alone.
    api_decode_memory_mb: int = Field(default=512, gt=0)
    api_decodes: int = Field(default=2, ge=1)
    # Fetches an API process makes at once (thumbnails, searches by a URI), and to any one
    # host; a request past either limit is answered 503 at once instead of holding one of
    # the threads every other request needs (a slow server held them all, and /healthz
    # waited 10 s behind it).
    api_fetches: int = Field(default=8, ge=1)
    api_fetches_per_host: int = Field(default=2, ge=1)
    # And for one caller (an API key, or a reviewer's session), whatever hosts it asks for.
    api_fetches_per_caller: int = Field(default=4, ge=1)
    # Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), the most
    # that keeps the shorter side at least this long (and never below the embedding model's
    # input side). At 512 a 12-megapixel photo decodes at 1/4 (1008x756). Measured on
    # phone-sized JPEGs (bench/decode_scale.py): decoding, PDQ and CLIP preprocessing take
    # about 52 ms on one core instead of 127; PDQ moves at most 6 bits from the
    # full-resolution hash on photos, 12 on smooth synthetic scenes (336, 1/8: 14 and 14;
    # 1024, 1/2: 4 and 6; Meta's own file hasher, which resizes to 512x512 first: 18). Of
    # 60 near-duplicate pairs none stopped matching (336: one did), and no unrelated pair
    # came within 100 bits. Limits still judge the size the file declares.
    decode_min_side: int = Field(default=512, ge=1)
    # A photo decoded at reduced scale whose PDQ comes within this many bits beyond the
    # threshold of a bank entry is hashed again at full resolution (fetched and decoded
    # anew), and that hash matched too: entries from hash lists (HMA, ThreatExchange,
    # NCMEC) were hashed at full resolution, and the reduced hash is within its drift of
    # the full one, so no entry the full-resolution hash matches is lost while the drift
    # stays within the margin (measured: see docs/matching.md). 0: never.
    pdq_full_resolution_margin: int = Field(default=16, ge=0, le=256)
    # Decode every image at full resolution: PDQ hashes equal to the reference's (pdqhash on
    # the whole image), at the full cost.
    full_resolution_decode: bool = False

    # Worker and delivery.
    queue: str = "screening"
    # Retro-hunt jobs (see `retrohunt.service`): their queue, which workers also consume
    # (unset: the screening queue's name and "-retrohunt", so that workers of separate
    # deployments or test runs sharing a Redis never take each other's jobs); how long a
    # message searches before the next one; how long a job waits after its first step,
    # beyond `bank_refresh_s`, before searching again the uploads screened meanwhile; and
    # how overdue an unfinished job is before the sweeper sends it again.
    retrohunt_queue: str | None = None
    retrohunt_step_s: float = Field(default=2.0, gt=0)
    # The share of the time a worker's hunt computes; it rests the remainder.
    retrohunt_duty: float = Field(default=0.5, gt=0, le=1)
    retrohunt_settle_s: float = Field(default=30.0, ge=0)
    retrohunt_stalled_after_s: float = Field(default=120.0, gt=0)
    # Re-embedding jobs (see `lifecycle.reembed`): their queue, which workers also consume
    # (unset: the screening queue's name and "-reembed"); items per step; items a worker
    # has in intake and forward passes at once for a step (unset: as many as screening's
    # task threads, so that a job at full duty fills the same batches); the share of the
    # time a worker's re-embedding computes (it rests the remainder, so that live
    # screening keeps its rate: bench/reembed.py); how long the catch-up keeps looking
    # after the scans; and how overdue an unfinished job is before the sweeper sends it.
    reembed_queue: str | None = None
    reembed_block: int = Field(default=64, ge=1)
    reembed_concurrency: int | None = Field(default=None, ge=1)
    reembed_duty: float = Field(default=0.2, gt=0, le=1)
    reembed_settle_s: float = Field(default=30.0, ge=0)
    reembed_stalled_after_s: float = Field(default=120.0, gt=0)
    worker_concurrency: int | None = Field(default=None, ge=1)
    # Processes that fetch, decode, hash and preprocess (one image at a time each, one BLAS
    # thread each), handing crops to the worker's model through shared memory. 0: in the
    # task threads, as before (see `resolved_intake_processes` for the default).
    intake_processes: int | None = Field(default=None, ge=0)
    # The longest one upload's intake may take (fetch and decode) before its process is
    # killed and replaced and the upload retried. Above fetch_timeout_s plus a large decode.
    intake_timeout_s: float = Field(default=120.0, gt=0)
    # Jobs sent down an intake process's pipe at once: the next waits there while the
    # current one runs, so the process never idles while the worker's interpreter, busy
    # with other threads, gets round to handing it one (measured on two cores:
    # bench/README.md). 1: one at a time.
    intake_jobs_per_process: int = Field(default=2, ge=1)
    # http(s) fetches a worker makes at once, apart from the intake processes, and to any
    # one host (see `worker/intake/fetches.py`). A fetch waits for its slots on its
    # screening thread; the screening threads and Celery's task threads are that many more
    # than the CPU stages need, so that this many uploads fetching from slow or hostile
    # servers, or waiting to, delay only themselves. 0: the intake processes fetch, as
    # before (a slow server holds a process for its whole deadline).
    worker_fetches: int = Field(default=64, ge=0)
    worker_fetches_per_host: int = Field(default=8, ge=1)
    # And for one submitter (an API key, or the operator at the command line), whatever
    # hosts its URIs name: below `worker_fetches`, so that one submitter's slow servers
    # leave room for everyone else's uploads. Unset: no limit beyond `worker_fetches`.
    worker_fetches_per_submitter: int | None = Field(default=48, ge=1)
    # Fetched bodies a worker holds at once, from their first byte until their upload is
    # screened (`images.body_budget`): a fetch past it waits, within its deadline. Slots
    # alone would allow (worker_fetches + uploads waiting for intake) x max_bytes.
    worker_fetch_memory_mb: int = Field(default=512, ge=1)
    # The longest a task waits on any other stage (a claim or result commit, a forward pass,
    # a bank search) before giving up with a retried fault: a stall never becomes a hang.
    stage_timeout_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    retry_backoff_s: float = Field(default=2.0, gt=0)
    retry_backoff_max_s: float = Field(default=300.0, gt=0)
    # Redis redelivers a message that was taken but never acknowledged after this long.
    visibility_timeout_s: int = Field(default=900, gt=0)
    # The sweeper re-enqueues uploads stuck in `queued` or `processing` for longer than this.
    stuck_after_s: float = Field(default=600.0, gt=0)
    # ... and those `processing` with no sign of life for longer than this (see
    # `moderation.worker.recovery`).
    hung_after_s: float = Field(default=1800.0, gt=0)
    sweep_interval_s: float = Field(default=10.0, gt=0)
    # Workers record a heartbeat this often; one silent for `worker_dead_after_s` is dead,
    # and the uploads it held are sent again at once instead of after `stuck_after_s`.
    worker_heartbeat_s: float = Field(default=5.0, gt=0)
    worker_dead_after_s: float = Field(default=30.0, gt=0)
    # Where a worker serves its Prometheus metrics (/metrics on every address); unset: not.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)

    # The analyst's similarity index (`moderation/search`): exact (IndexFlatIP) below
    # `search_exact_max` vectors, HNSW in memory up to `search_hnsw_max`, IVF above
    # (PQ-compressed when `search_ivf_pq_m` > 0). Measured by bench/search.py on 768-d
    # clustered vectors, one core per query (p99 CPU time): exact takes 4-5 ms at 25k
    # vectors and 15-22 at 100k; HNSW (M 32, efConstruction 100) reaches recall@10 0.97 at
    # efSearch 128 in 1.8 ms at 1M vectors, but holds 3.2 GB per million and took 19 min
    # to build on two cores; IVF-Flat (nprobe 8) 0.975 in 2 ms, IVF-PQ with 100 candidates
    # rescored 0.957 in 1.2 ms at 112 MB of codes. Scale the sizes by 768/d.
    # Its search breadth (efSearch, nprobe) is the smallest that meets `search_recall_target`
    # (recall@`search_recall_k` against exact search on held-out queries). Snapshots of the
    # index live in `index_dir`, one file per model (relative paths: to the working directory).
    index_dir: Path = Path(".moderation/index")
    search_exact_max: int = Field(default=25_000, ge=0)
    search_hnsw_max: int = Field(default=1_000_000, ge=0)
    search_hnsw_m: int = Field(default=32, ge=4)
    search_hnsw_ef_construction: int = Field(default=100, ge=8)
    # IVF lists: unset means 4 * sqrt(n); trained on at most this many sampled vectors.
    search_ivf_nlist: int | None = Field(default=None, ge=1)
    search_ivf_pq_m: int = Field(default=0, ge=0)
    search_train_sample: int = Field(default=200_000, ge=1000)
    search_recall_target: float = Field(default=0.95, gt=0, le=1)
    search_recall_k: int = Field(default=10, ge=1)
    search_tuning_queries: int = Field(default=200, ge=10)
    # Frames taken from the index before the exact rerank; filters that reject most of
    # them widen this, and below `search_exact_scan_max` matching rows the filtered rows
    # are scanned exactly instead.
    search_candidates: int = Field(default=100, ge=1)
    search_exact_scan_max: int = Field(default=20_000, ge=0)
    # Long-lived processes (the API) read new embeddings this often; the CLI once per call.
    search_tail_interval_s: float = Field(default=1.0, gt=0)
    # The checkpoint passes an embedding id only once every transaction that could still
    # commit a lower id has ended (see `search/follow.py`), and at least this long after.
    search_commit_lag_s: float = Field(default=1.0, ge=0)
    # A process that has added this many rows since the last snapshot writes a new one.
    search_snapshot_every: int = Field(default=10_000, ge=1)
    # Where the general index lives: `faiss` in each process (the default), or `milvus`, a
    # server or cluster that `moderation index sync` keeps current from `embeddings`
    # (docs/milvus.md). URI http(s)://host:19530 (https for TLS); the token is
    # "user:password" or an API key; the database must exist ("default" always does).
    search_backend: Literal["faiss", "milvus"] = "faiss"
    milvus_uri: str = "http://127.0.0.1:19530"
    milvus_token: SecretStr | None = None
    milvus_db: str = "default"
    # Per call to the server: a search or write slower than this means Milvus is away (503).
    milvus_timeout_s: float = Field(default=10.0, gt=0)
    # Bounded: a search may miss writes of the last fraction of a second (measured 0.2-0.4 s
    # to searchable, docs/milvus.md); Strong makes every search wait for the latest writes.
    milvus_consistency: Literal["Strong", "Bounded", "Session", "Eventually"] = "Bounded"
    # Collections are named `<prefix>_m<model id>_<n>`, served through the alias
    # `<prefix>_m<model id>`; several installations may share one Milvus by prefix.
    milvus_collection_prefix: str = Field(default="moderation", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    milvus_shards: int = Field(default=1, ge=1, le=16)
    # Run the sync inside `moderation api` too (one process per installation should).
    milvus_sync_in_api: bool = False
    milvus_sync_interval_s: float = Field(default=1.0, gt=0)
    # /readyz fails when the sync's last completed pass started longer ago than this.
    milvus_max_lag_s: float = Field(default=60.0, gt=0)
    # What orders the top candidates after the index (`search/rerankers.py`): "exact"
    # rescores the stored float32 vectors; "cross-encoder" scores a text query against the
    # top `search_rerank_top` uploads' images with BLIP's image-text matching head
    # (`search_rerank_model`), fetched under the URI policy; image queries stay exact.
    search_reranker: Literal["exact", "cross-encoder"] = "exact"
    search_rerank_model: str = "Salesforce/blip-itm-base-coco"
    search_rerank_top: int = Field(default=20, ge=1)
    # The golden set (`moderation eval`): results judged per query, a run every this many
    # seconds by the workers' sweeper (None: never; `moderation eval run` by hand), and the
    # fall in recall from the run before it that is logged as a warning and flagged in
    # /metrics (`moderation_eval_regressed`).
    eval_k: int = Field(default=10, ge=1, le=1000)
    eval_interval_s: float | None = Field(default=None, gt=0)
    eval_drop_margin: float = Field(default=0.05, ge=0, le=1)
    # Verdict webhooks (docs/api.md, "Webhooks"). Events are written to the outbox only while a
    # URL is set; the sender (`moderation webhooks send`) signs each with the secret.
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    # Also send an event when screening finds hits (and when a reviewer dismisses them),
    # not only when a reviewer confirms them.
    webhook_on_screening_hit: bool = False
    # One POST, connect to last byte; a receiver slower than this is retried.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # Retry delays double from the base up to the cap: a receiver down for an hour is tried
    # about a dozen times and gets its backlog within one cap of coming back.
    webhook_retry_base_s: float = Field(default=5.0, gt=0)
    webhook_retry_max_s: float = Field(default=600.0, gt=0)
    # A claimed event is hidden from other senders this long; a sender that dies mid-delivery
    # releases its events when the lease runs out. Longer than the timeout.
    webhook_lease_s: float = Field(default=60.0, gt=0)
    # An event still undelivered this long after it was written (or redelivered) is failed
    # (`moderation webhooks list --status failed`; `webhooks redeliver` revives it).
    webhook_give_up_after_s: float = Field(default=3 * 24 * 3600.0, gt=0)
    # How often an idle sender looks for due events.
    webhook_poll_s: float = Field(default=1.0, gt=0)

    # The largest request body the API reads, on routes that take no image (those take
    # `max_bytes` and a form's framing): refused before it is read, cut off while it streams.
    # A batch of 1000 uploads with short metadata is ~0.3 MB; a larger one is split.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    # API keys checked once are answered from memory until `api_keys` changes (a NOTIFY on
    # revocation, `moderation.auth.key_cache`): saves a query per request. False: every
    # request reads the table.
    api_key_cache: bool = True

    # The review queue (moderation/review/cards.py, claims.py, undo.py). A reviewer claims
    # this many cards at a time, each theirs alone for the lease; renewed as they claim more.
    review_claim_batch: int = Field(default=10, ge=1, le=200)
    review_claim_minutes: float = Field(default=15.0, gt=0)
    # Cards waiting longer are marked, and counted on the queue's head (a service target).
    review_age_target_hours: float = Field(default=24.0, gt=0)
    # A decision can be taken back this long by its decider; its webhook waits as long.
    review_undo_seconds: float = Field(default=8.0, ge=0, le=300)
    # A decision form posted after its session ended is kept this long for the reviewer to
    # get back after logging in again.
    review_pending_form_minutes: float = Field(default=60.0, gt=0)

    # Web pages: how long a login lasts before the reviewer pastes their key again.
    web_session_hours: float = Field(default=12.0, gt=0)
    # Side of the thumbnails of uploads that kept no evidence (the analysts' search results),
    # fetched again on view and shown only if their SHA-256 is the one screened.
    thumbnail_side: int = Field(default=320, ge=32, le=2048)

    # Evidence (`moderation.evidence`, docs/evidence.md): what screening saw of an upload
    # that hit, kept for review and reports. Where: a directory (a path or file:///dir) or
    # an S3-compatible bucket (s3://bucket/prefix; credentials as boto3 finds them, and
    # `evidence_s3_endpoint_url` for a store other than AWS). Sealed with AES-256-GCM under
    # `evidence_key` (32 bytes, URL-safe base64: `moderation evidence new-key`); with no key
    # nothing is kept, and reviewers see that no evidence was preserved. Older keys, still
    # read after a rotation: `evidence_previous_keys`, comma-separated.
    evidence_uri: str = ".moderation/evidence"
    evidence_key: SecretStr | None = None
    evidence_previous_keys: SecretStr | None = None
    evidence_s3_endpoint_url: str | None = None
    # Kept this long after capture, then deleted by the workers' sweepers, unless the upload
    # is under legal hold (escalated, or held by hand: `moderation evidence hold`).
    evidence_retention_days: float = Field(default=90.0, gt=0)
    # Longer side of each kept frame, in pixels.
    evidence_side: int = Field(default=256, ge=32, le=1024)

    @field_validator(
        "allowed_uri_prefixes", "fetch_allowed_networks", "clip_match_methods", mode="before"
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def resolved_clip_plan_cache(self) -> Path:
        if self.clip_plan_cache is not None:
            return self.clip_plan_cache
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(cache) / "moderation" / "clip-match-plan.json"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_model(self) -> str:
        if self.model:
            return self.model
        return DEFAULT_CUDA_MODEL if self.resolved_device() == "cuda" else DEFAULT_CPU_MODEL

    def resolved_batch_size(self) -> int:
        if self.batch_size:
            return self.batch_size
        return 128 if self.resolved_device() == "cuda" else 8

    def resolved_compile(self) -> bool:
        if self.compile_model is not None:
            return self.compile_model
        return self.resolved_device() == "cuda"

    def resolved_streams(self) -> int:
        if self.inference_streams:
            return self.inference_streams
        return 2 if self.resolved_device() == "cuda" else min(4, _cpu_count())

    def resolved_torch_threads(self) -> int:
        """Intra-op threads per stream on CPU: the cores shared out between the streams."""
        return max(1, _cpu_count() // self.resolved_streams())

    def resolved_intake_processes(self) -> int:
        """Intake processes: on CUDA every core but two (the feeder thread's interpreter and
        the database writers, Celery, PostgreSQL); on CPU the model needs cores too, so half.
        Measured on two cores (bench/README.md)."""
        if self.intake_processes is not None:
            return self.intake_processes
        cores = _cpu_count()
        if self.resolved_device() == "cuda":
            return max(1, cores - 2)
        return max(1, cores // 2)

    def resolved_retrohunt_queue(self) -> str:
        return self.retrohunt_queue or f"{self.queue}-retrohunt"

    def resolved_reembed_queue(self) -> str:
        return self.reembed_queue or f"{self.queue}-reembed"

    def resolved_reembed_concurrency(self) -> int:
        return self.reembed_concurrency or self.resolved_concurrency()

    def resolved_concurrency(self) -> int:
        # Enough tasks in flight to fill every stream's next batch while the current ones run.
        return self.worker_concurrency or 2 * self.resolved_batch_size() * self.resolved_streams()


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def settings_fields(variables: Mapping[str, str]) -> dict[str, Any]:
    """MODERATION_* variables as `Settings` fields by name: for a process that gives a child
    these variables and builds its own settings from the same values (`Settings(**fields)`)."""
    return {name.removeprefix(ENV_PREFIX).lower(): value for name, value in variables.items()}
