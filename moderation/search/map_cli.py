"""`moderation index map`: the embedding-space picture for analysts (attached to the
`index` group)."""

from __future__ import annotations

from pathlib import Path

import click

from moderation.config import get_settings


@click.command("map")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("map.png"),
    show_default=True,
    help="The PNG to write.",
)
@click.option(
    "--sample",
    type=click.IntRange(min=2),
    default=10_000,
    show_default=True,
    help="Uploads drawn: every one with a bank hit (up to half), the rest at random.",
)
@click.option("--model", help="The embedding model's name (default: the configured model).")
def index_map(out: Path, sample: int, model: str | None) -> None:
    """Draw a sample of the corpus in two dimensions (PCA), coloured by bank hit."""
    from moderation.db import session_scope
    from moderation.search.projection import render_map, sample_corpus

    model_name = model or get_settings().resolved_model()
    with session_scope() as session:
        corpus = sample_corpus(session, model_name, sample)
    projection = render_map(
        corpus.vectors,
        corpus.labels,
        out,
        title=f"{model_name}: {len(corpus.labels)} of {corpus.corpus_size} uploads, PCA",
    )
    hits = sum(label != "no hit" for label in corpus.labels)
    click.echo(
        f"wrote {out}: {len(corpus.labels)} uploads of {corpus.corpus_size} ({hits} with a bank "
        f"hit); the two axes hold {sum(projection.explained):.0%} of the sample's variance"
    )
