"""Rows of the hot paths read without compiling a query each time.

The ORM compiles a query on every call: for ``Token.objects.select_related("user").get(key=...)``
that is two thirds of its CPU (about 0.3 ms of 0.45 on the 2-core machine), more than the round trip.
A ``RowQuery`` builds its SELECT once per process from the models' own field lists, and turns a
row into model instances with ``Model.from_db`` and each field's own database converters, as the
ORM's iterator does: the instances are the ones the ORM would give (``_state`` included).

Only for lookups that run on every request (the token, a task's repository); everything else
uses the ORM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import connections
from django.db.models import Model


def _converters(model: type[Model], alias: str, connection) -> list[tuple[int, list[Callable]]]:
    """(position, converters) of each concrete field of ``model`` that needs converting, as the
    ORM's compiler finds them (the backend's, then the field's own)."""
    out = []
    for position, field in enumerate(model._meta.concrete_fields):
        column = field.get_col(alias)
        found = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if found:
            out.append((position, [(converter, column) for converter in found]))
    return out


class RowQuery:
    """``SELECT`` every concrete column of ``model`` (and of the model a foreign key ``related``
    points to, joined) ``WHERE <where>``, at most one row.

    ``where`` is SQL with ``%s`` placeholders over the aliases ``m`` (the model) and ``r`` (the
    related model); the caller passes values already prepared for the database (an id, a text).
    ``get`` returns the instance (with the related one cached on it, as ``select_related``
    leaves it) or None."""

    def __init__(self, model: type[Model], where: str, *, related: str | None = None, using: str = "default"):
        self.model, self.where, self.related_name, self.using = model, where, related, using
        self._compiled: tuple | None = None

    def _compile(self, connection) -> tuple:
        quote = connection.ops.quote_name
        model = self.model
        fields = model._meta.concrete_fields
        columns = [f"m.{quote(f.column)}" for f in fields]
        joins = ""
        related = None
        if self.related_name:
            fk = model._meta.get_field(self.related_name)
            related = fk.related_model
            columns += [f"r.{quote(f.column)}" for f in related._meta.concrete_fields]
            joins = (
                f" INNER JOIN {quote(related._meta.db_table)} r"
                f" ON (r.{quote(fk.target_field.column)} = m.{quote(fk.column)})"
            )
        sql = f"SELECT {', '.join(columns)} FROM {quote(model._meta.db_table)} m{joins} WHERE {self.where} LIMIT 1"
        parts = [(model, [f.attname for f in fields], _converters(model, "m", connection), len(fields))]
        if related is not None:
            related_fields = related._meta.concrete_fields
            parts.append(
                (
                    related,
                    [f.attname for f in related_fields],
                    _converters(related, "r", connection),
                    len(related_fields),
                )
            )
        return sql, parts, (fk if related is not None else None)

    def get(self, *params: Any) -> Model | None:
        connection = connections[self.using]
        if self._compiled is None:
            self._compiled = self._compile(connection)
        sql, parts, fk = self._compiled
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        if row is None:
            return None
        instances = []
        start = 0
        for model, attnames, converters, width in parts:
            values = list(row[start : start + width])
            for position, chain in converters:
                value = values[position]
                for converter, column in chain:
                    value = converter(value, column, connection)
                values[position] = value
            instances.append(model.from_db(self.using, attnames, values))
            start += width
        if fk is not None:
            fk.set_cached_value(instances[0], instances[1])
        return instances[0]


def bigint_or_none(value: int) -> int | None:
    """``value`` when a bigint column can hold it (a larger id matches no row: SQLite would raise)."""
    return value if -(2**63) <= value < 2**63 else None
