"""`moderation index map`: the embedding-space picture for analysts (attached to the
`index` group)."""

from __future__ import annotations

from pathlib import Path

import click

from moderation.runtime import Runtime, pass_runtime


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
@click.option("--model", help="The embedding model's name (default: the active model).")
@pass_runtime
def index_map(runtime: Runtime, out: Path, sample: int, model: str | None) -> None:
    """Draw a sample of the corpus in two dimensions (PCA), coloured by bank hit."""
    from moderation.embedding import registry
    from moderation.search.projection import render_map, sample_corpus

    with runtime.session() as session:
        model_name = model or registry.serving_name(session, runtime.settings.resolved_model())
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
