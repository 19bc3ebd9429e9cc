"""One settings object for the whole service, read from `MODERATION_*` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The production checkpoint on a GPU, and the smaller one that is still usable on a CPU.
DEFAULT_CUDA_MODEL = "openai/clip-vit-large-patch14-336"
DEFAULT_CPU_MODEL = "openai/clip-vit-base-patch32"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODERATION_", extra="ignore")

    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Connections per process; worker threads share them (each holds one only briefly).
    db_pool_size: int = Field(default=10, ge=1)

    # Embedding model: a Hugging Face CLIP id or a local directory. Unset means the default
    # for the device the worker ends up on (see `resolved_model`).
    model: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Images per forward pass; unset means 64 on CUDA and 8 on CPU.
    batch_size: int | None = Field(default=None, ge=1)
    # Forward passes run at once, each on its own thread. On CPU, one single-threaded stream
    # per core beats one stream spread over all cores (measured on ViT-B/32, 2 cores: 14.4
    # against 12.0 images/s) and suffers far less when decoding competes for the cores.
    # Unset means 1 on CUDA and one per core, at most 4, on CPU.
    inference_streams: int | None = Field(default=None, ge=1)
    # How long the batcher waits for more images before running a partial batch.
    batch_wait_ms: float = Field(default=10.0, ge=0)

    # Matching thresholds. Cosine distance for CLIP (a bank may override it); Hamming bits for PDQ.
    match_radius: float = Field(default=0.05, ge=0, le=2)
    pdq_threshold: int = Field(default=31, ge=0, le=256)
    # PDQ hashes of flat, featureless frames are noise; below this quality they are not matched.
    pdq_min_quality: int = Field(default=50, ge=0, le=100)
    # Running workers re-check the banks at most this often, so changes land within it.
    bank_refresh_s: float = Field(default=5.0, ge=0)

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

    # Worker and delivery.
    queue: str = "screening"
    worker_concurrency: int | None = Field(default=None, ge=1)
    max_attempts: int = Field(default=5, ge=1)
    retry_backoff_s: float = Field(default=2.0, gt=0)
    retry_backoff_max_s: float = Field(default=300.0, gt=0)
    # Redis redelivers a message that was taken but never acknowledged after this long.
    visibility_timeout_s: int = Field(default=900, gt=0)
    # The sweeper re-enqueues uploads stuck in `queued` or `processing` for longer than this.
    stuck_after_s: float = Field(default=600.0, gt=0)
    sweep_interval_s: float = Field(default=10.0, gt=0)
    # Workers record a heartbeat this often; one silent for `worker_dead_after_s` is dead,
    # and the uploads it held are sent again at once instead of after `stuck_after_s`.
    worker_heartbeat_s: float = Field(default=5.0, gt=0)
    worker_dead_after_s: float = Field(default=30.0, gt=0)
    # Where a worker serves its Prometheus metrics (/metrics on every address); unset: not.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("allowed_uri_prefixes", "fetch_allowed_networks", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

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
        return 64 if self.resolved_device() == "cuda" else 8

    def resolved_streams(self) -> int:
        if self.inference_streams:
            return self.inference_streams
        return 1 if self.resolved_device() == "cuda" else min(4, _cpu_count())

    def resolved_torch_threads(self) -> int:
        """Intra-op threads per stream on CPU: the cores shared out between the streams."""
        return max(1, _cpu_count() // self.resolved_streams())

    def resolved_concurrency(self) -> int:
        # Enough tasks in flight to fill every stream's next batch while the current ones run.
        return self.worker_concurrency or 2 * self.resolved_batch_size() * self.resolved_streams()


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
