"""Output helpers shared by the command-line modules: JSON for machines, tables for people."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime
from typing import Any

import click


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def emit_json(payload: object) -> None:
    click.echo(json.dumps(payload, default=_default, indent=2))


def emit_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    empty: str,
    headers: Mapping[str, str] | None = None,
    widest: Mapping[str, int] | None = None,
) -> None:
    """`rows` as a table of `columns`; `headers`: a shorter heading for some columns;
    `widest`: cut some columns' values to this many characters (with an ellipsis), so
    that a long name cannot widen the table past a terminal."""
    if not rows:
        click.echo(empty)
        return
    cells = [[_cut(_cell(row.get(c)), (widest or {}).get(c)) for c in columns] for row in rows]
    columns = [(headers or {}).get(c, c) for c in columns]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _cut(text: str, width: int | None) -> str:
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def say_if_cut(shown: int, total: int, what: str, as_json: bool) -> None:
    """Listings never cut silently. On stderr beside JSON, which stays a plain list."""
    if total > shown:
        click.echo(
            f"showing {shown:,} of {total:,} {what}, newest first: --limit N or --all for more",
            err=as_json,
        )


_LIMIT_OPTIONS = [
    click.option(
        "--limit", default=100, show_default=True, type=click.IntRange(min=1), help="Newest N."
    ),
    click.option("--all", "show_all", is_flag=True, help="All of them, however many."),
]


def limit_options(command: Any) -> Any:
    for option in reversed(_LIMIT_OPTIONS):
        command = option(command)
    return command
