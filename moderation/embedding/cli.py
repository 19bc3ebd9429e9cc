"""`moderation embed` and `moderation model tiny`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from moderation.config import get_settings
from moderation.embedding.service import embed_first_frame
from moderation.embedding.tiny import (
    ARCHITECTURES,
    TINY_MODEL_WARNING,
    write_random_clip,
    write_tiny_clip,
)
from moderation.images.decode import DecodeLimits
from moderation.images.fetch import fetch
from moderation.images.uri_policy import UriPolicy

if TYPE_CHECKING:
    from moderation.embedding.clip import ClipEmbedder


def load_embedder() -> ClipEmbedder:
    # Imported here: torch and transformers take seconds to load, and most commands
    # never run a model.
    from moderation.embedding.clip import ClipEmbedder

    settings = get_settings()
    return ClipEmbedder(settings.resolved_model(), settings.resolved_device())


@click.command()
@click.argument("image")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the embedding (.npy, float32, L2-normalised).",
)
def embed(image: str, out: Path) -> None:
    """Write the embedding of IMAGE under the configured model.

    Partners can share these instead of the images. For an animated image, the first
    frame is embedded.
    """
    settings = get_settings()
    embedder = load_embedder()
    data = fetch(
        image,
        # The operator's own file, named on their command line.
        policy=UriPolicy.from_settings(settings).allowing_files([image]),
        max_bytes=settings.max_bytes,
        timeout_s=settings.fetch_timeout_s,
    )
    _, vector = embed_first_frame(data, embedder, DecodeLimits.from_settings(settings))
    # Through a file object: given a path, np.save appends ".npy" to any other name.
    with out.open("wb") as handle:
        np.save(handle, vector)
    click.echo(f"wrote {out}: {embedder.dim}-d embedding from {embedder.name}")


@click.group()
def model() -> None:
    """Embedding model utilities."""


@model.command("tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
def tiny(directory: Path, seed: int) -> None:
    """Write a tiny randomly initialised CLIP (weights, tokenizer, processor) to DIRECTORY."""
    write_tiny_clip(directory, seed=seed)
    _written(directory, "a tiny CLIP")


@model.command("random")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--arch",
    type=click.Choice(sorted(ARCHITECTURES)),
    default="vit-b-32",
    show_default=True,
    help="Whose shapes to copy.",
)
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
def random_(directory: Path, arch: str, seed: int) -> None:
    """Write a full-size CLIP architecture with random weights, for speed benchmarks."""
    write_random_clip(directory, arch, seed=seed)
    _written(directory, f"a random {arch} CLIP")


def _written(directory: Path, what: str) -> None:
    click.echo(f"wrote {what} to {directory}")
    click.echo(f"use it with: MODERATION_MODEL={directory.resolve()}")
    click.echo(TINY_MODEL_WARNING)
