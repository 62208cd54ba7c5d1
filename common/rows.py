"""Rows of the hot paths read without compiling a query each time.

The ORM compiles a query on every call: for ``Token.objects.select_related("user").get(key=...)``
that is two thirds of its CPU (about 0.3 ms of 0.45 on the 2-core machine), more than the round trip.
A ``RowQuery`` builds its SELECT once per process from the models' own field lists, and turns a
row into model instances with ``Model.from_db`` and each field's own database converters, as the
ORM's iterator does: the instances are the ones the ORM would give (``_state`` included).

Only for what runs on every request or claim (the token, a task's repository, the claimed
task); everything else uses the ORM. ``bound_cursor`` serves the hot statements with many
parameters (a claim, a task's creation, an event batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from django.db import connections
from django.db.models import Model


def _converters(model: type[Model], alias: str, connection) -> list[tuple[int, list[tuple[Callable, Any]]]]:
    """(position, converters) of each concrete field of ``model`` that needs converting, as the
    ORM's compiler finds them (the backend's, then the field's own)."""
    out = []
    for position, field in enumerate(model._meta.concrete_fields):
        column = field.get_col(alias)
        found = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if found:
            out.append((position, [(converter, column) for converter in found]))
    return out


class ModelRows:
    """Model instances from rows holding every concrete column of ``model`` in field order (a
    ``SELECT m.*`` or ``RETURNING`` written for it), as the ORM's iterator would build them."""

    def __init__(self, model: type[Model], using: str = "default"):
        self.model, self.using = model, using
        self.attnames = [f.attname for f in model._meta.concrete_fields]
        self.width = len(self.attnames)
        self._converters: list | None = None

    def instance(self, values: Sequence[Any]) -> Model:
        connection = connections[self.using]
        if self._converters is None:
            self._converters = _converters(self.model, self.model._meta.db_table, connection)
        values = list(values)
        for position, chain in self._converters:
            value = values[position]
            for converter, column in chain:
                value = converter(value, column, connection)
            values[position] = value
        return self.model.from_db(self.using, self.attnames, values)


class RowQuery:
    """``SELECT`` every concrete column of ``model`` (and of the model a foreign key ``related``
    points to, joined) ``WHERE <where>``, at most one row.

    ``where`` is SQL with ``%s`` placeholders over the aliases ``m`` (the model) and ``r`` (the
    related model); the caller passes values already prepared for the database (an id, a text).
    ``get`` returns the instance (with the related one cached on it, as ``select_related``
    leaves it) or None."""

    def __init__(self, model: type[Model], where: str, *, related: str | None = None, using: str = "default"):
        self.using = using
        self.rows = ModelRows(model, using)
        self.fk = model._meta.get_field(related) if related else None
        self.related_rows = ModelRows(self.fk.related_model, using) if self.fk else None
        self.where = where
        self._sql: str | None = None

    def _compile(self, connection) -> str:
        quote = connection.ops.quote_name
        model = self.rows.model
        columns = [f"m.{quote(f.column)}" for f in model._meta.concrete_fields]
        joins = ""
        if self.fk is not None:
            related = self.fk.related_model
            columns += [f"r.{quote(f.column)}" for f in related._meta.concrete_fields]
            joins = (
                f" INNER JOIN {quote(related._meta.db_table)} r"
                f" ON (r.{quote(self.fk.target_field.column)} = m.{quote(self.fk.column)})"
            )
        return f"SELECT {', '.join(columns)} FROM {quote(model._meta.db_table)} m{joins} WHERE {self.where} LIMIT 1"

    def get(self, *params: Any) -> Model | None:
        connection = connections[self.using]
        if self._sql is None:
            self._sql = self._compile(connection)
        with connection.cursor() as cursor:
            cursor.execute(self._sql, params)
            row = cursor.fetchone()
        if row is None:
            return None
        instance = self.rows.instance(row[: self.rows.width])
        if self.fk is not None:
            self.fk.set_cached_value(instance, self.related_rows.instance(row[self.rows.width :]))
        return instance


def bigint_or_none(value: int) -> int | None:
    """``value`` when a bigint column can hold it (a larger id matches no row: SQLite would raise)."""
    return value if -(2**63) <= value < 2**63 else None


@contextlib.contextmanager
def bound_cursor(using: str = "default") -> Iterator[Any]:
    """A cursor whose parameters travel beside the statement instead of being quoted into its text
    (psycopg's server-side binding, through Django's own ServerBindingCursor, the one the
    ``server_side_binding`` option would give every query), for the hot statements with many
    parameters: quoting a claim's or a task's values was a fifth of their Python time. Nothing is
    prepared (Django keeps psycopg's prepare_threshold off, so poolers stay fine), errors are
    Django's, and the statement is logged like any other (the statement-count tests see it).
    On other databases, the usual cursor."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        with connection.cursor() as cursor:
            yield cursor
        return
    from django.db.backends.postgresql.base import ServerBindingCursor

    # What BaseDatabaseWrapper._cursor does, with this cursor class.
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    with connection.wrap_database_errors:
        raw = ServerBindingCursor(connection.connection)
    connection.validate_thread_sharing()
    cursor = connection.make_debug_cursor(raw) if connection.queries_logged else connection.make_cursor(raw)
    with cursor:
        yield cursor
