"""`moderation api`: serve the HTTP API and the review pages."""

from __future__ import annotations

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--workers", default=1, show_default=True, type=int, help="Server processes.")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json) with uvicorn."""
    from moderation.main.serve import serve

    serve(host, port, workers)
