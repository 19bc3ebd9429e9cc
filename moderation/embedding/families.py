"""Which embedder a checkpoint gets: chosen from its config's `model_type`, never from
its name, so any local directory or Hugging Face id loads unchanged."""

from __future__ import annotations

from typing import Any

from moderation.config import Settings
from moderation.embedding.checkpoints import check_loadable, loading
from moderation.embedding.clip import ClipEmbedder
from moderation.embedding.embedder import (
    Embedder,
    UnsupportedModel,
    batch_shapes,
    quiet_transformers,
)
from moderation.embedding.preprocessing import Preprocessing
from moderation.embedding.siglip import SiglipEmbedder


def read_config(name: str) -> Any:
    """A checkpoint's config (a small JSON file), without its weights."""
    from transformers import AutoConfig

    quiet_transformers()
    check_loadable(name)
    with loading(name):
        return AutoConfig.from_pretrained(name)


def open_embedder(name: str, device: str = "cpu", *, cpu_threads: int | None = None) -> Embedder:
    """The embedder for a checkpoint (a local directory or a Hugging Face id), of the family
    its config names; its weights load on first use. Raises `UnsupportedModel`."""
    config = read_config(name)
    families: dict[str, type[Embedder]] = {"clip": ClipEmbedder, "siglip": SiglipEmbedder}
    model_type = getattr(config, "model_type", None)
    if model_type == "siglip2":
        raise UnsupportedModel(
            f"{name} is a SigLIP 2 NaFlex checkpoint (variable resolution); use a "
            "fixed-resolution SigLIP 2 checkpoint (model_type siglip, e.g. "
            "google/siglip2-base-patch16-224)"
        )
    family = families.get(str(model_type))
    if family is None:
        raise UnsupportedModel(
            f"{name} is a {model_type!r} checkpoint; the embedding model must be one of "
            f"{', '.join(sorted(families))}"
        )
    return family(name, device, config=config, cpu_threads=cpu_threads)


def embedding_dim(name: str) -> int:
    """A checkpoint's embedding size, read from its config without loading the weights."""
    return open_embedder(name).dim


def embedder_for_worker(settings: Settings, name: str) -> Embedder:
    """A model as a worker runs it (and the benchmark's baseline with it): on CPU, each
    inference stream gets its share of the cores; loaded now; compiled where that is
    configured (by default on CUDA)."""
    embedder = open_embedder(
        name, settings.resolved_device(), cpu_threads=settings.resolved_torch_threads()
    ).load()
    if settings.resolved_compile():
        embedder.compile(batch_shapes(settings.resolved_batch_size()))
    return embedder


def preprocessing_of(name: str) -> Preprocessing:
    """A checkpoint's preprocessing, read from its config files without its weights."""
    return open_embedder(name).preprocess
