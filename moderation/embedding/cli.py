"""`moderation embed` and `moderation model tiny`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from moderation.config import Settings
from moderation.embedding.service import embed_first_frame
from moderation.embedding.tiny import (
    ARCHITECTURES,
    FAMILIES,
    SIGLIP_ARCHITECTURES,
    TINY_MODEL_WARNING,
    write_random_clip,
    write_random_siglip,
    write_tiny,
)
from moderation.images.decode import DecodeLimits
from moderation.images.fetch import fetch
from moderation.images.uri_policy import UriPolicy
from moderation.runtime import Runtime, pass_runtime

if TYPE_CHECKING:
    from moderation.embedding.embedder import Embedder


def load_embedder(settings: Settings, name: str) -> Embedder:
    """The named model on the configured device, its weights loaded on first use (the
    serving one's name: `registry.serving_name`)."""
    # Imported here: torch and transformers take seconds to load, and most commands
    # never run a model.
    from moderation.embedding.families import open_embedder

    return open_embedder(name, settings.resolved_device())


@click.command()
@click.argument("image")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the embedding (.npy, float32, L2-normalised).",
)
@pass_runtime
def embed(runtime: Runtime, image: str, out: Path) -> None:
    """Write the embedding of IMAGE under the active model (the configured one while the
    registry has none).

    Partners can share these instead of the images. For an animated image, the first
    frame is embedded.
    """
    from moderation.embedding import registry

    settings = runtime.settings
    with runtime.session() as session:
        name = registry.serving_name(session, settings.resolved_model())
    embedder = load_embedder(settings, name)
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
@click.option(
    "--family", type=click.Choice(FAMILIES), default="clip", show_default=True, help="Which model."
)
def tiny(directory: Path, seed: int, family: str) -> None:
    """Write a tiny randomly initialised CLIP or SigLIP (weights, tokenizer, processor) to
    DIRECTORY."""
    write_tiny(directory, family, seed=seed)
    _written(directory, f"a tiny {family}")


@model.command("random")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--arch",
    type=click.Choice(sorted({*ARCHITECTURES, *SIGLIP_ARCHITECTURES})),
    default="vit-b-32",
    show_default=True,
    help="Whose shapes to copy.",
)
@click.option(
    "--family", type=click.Choice(FAMILIES), default="clip", show_default=True, help="Which model."
)
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
def random_(directory: Path, arch: str, family: str, seed: int) -> None:
    """Write a full-size CLIP or SigLIP architecture with random weights, for speed
    benchmarks (SigLIP: --arch vit-b-32-256)."""
    if family == "siglip":
        write_random_siglip(directory, arch, seed=seed)
    else:
        write_random_clip(directory, arch, seed=seed)
    _written(directory, f"a random {arch} {family}")


def _written(directory: Path, what: str) -> None:
    click.echo(f"wrote {what} to {directory}")
    click.echo(f"use it with: MODERATION_MODEL={directory.resolve()}")
    click.echo(TINY_MODEL_WARNING)
