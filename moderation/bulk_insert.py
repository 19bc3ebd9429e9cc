"""Inserting many rows with one statement: the rows arrive as one array per column and
PostgreSQL unnests them. Used where a transaction writes a group's rows at once (the
worker's result writer)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY, insert

from moderation.db import Base


def insert_rows_statement(model: type[Base], columns: dict[str, Any]) -> Any:
    """Insert rows that arrive as one array per column, unnested by PostgreSQL, skipping
    rows already there: one statement for a group whatever its size, compiled once. As an
    `executemany` of one parameter set per row, the three inserts of a group cost a third
    of the result writer's time, most of it in SQLAlchemy's per-row parameter processing
    (py-spy, `bench/screening.py --arch tiny` on two cores)."""
    rows = (
        func.unnest(*(bindparam(f"{name}s", type_=ARRAY(type_)) for name, type_ in columns.items()))
        .table_valued(*columns)
        .render_derived(name="new_rows")
    )
    return (
        insert(model)
        .from_select(list(columns), select(*(rows.c[name] for name in columns)))
        .on_conflict_do_nothing()
    )


class ArrayRows:
    """Rows gathered as one list per column, the parameters of an `insert_rows_statement`."""

    def __init__(self, *names: str) -> None:
        self.lists: dict[str, list[Any]] = {f"{name}s": [] for name in names}
        self._appends = [values.append for values in self.lists.values()]

    def add(self, *row: Any) -> None:
        for append, value in zip(self._appends, row, strict=True):
            append(value)

    def __bool__(self) -> bool:
        return any(self.lists.values())
