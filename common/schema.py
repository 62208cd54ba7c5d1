"""The one check every command that reads or writes our tables makes first: is the schema there?

Without it a fresh database answers with a 60-line traceback ending in "no such table"; with it
the command says in one line to run ``manage.py migrate`` and exits with code 2.
"""

from __future__ import annotations

from django.core.management.base import CommandError

SCHEMA_MISSING_EXIT = 2


def unapplied_migrations(using: str = "default") -> tuple[list[str], bool]:
    """Migrations of the installed apps not applied to the database, and whether none ever was
    (a fresh database). Raises django.db.Error when the database cannot be reached at all."""
    from django.db import connections
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connections[using])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    missing = [f"{migration.app_label}.{migration.name}" for migration, _backwards in plan]
    return missing, not executor.loader.applied_migrations


def require_schema(using: str = "default") -> None:
    """Raise a one-line CommandError (exit code 2) unless the database is migrated."""
    from django.db import Error as DatabaseError

    try:
        missing, fresh = unapplied_migrations(using)
    except DatabaseError as exc:
        # The driver's first line names host and database, never the password.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CommandError(
            f"cannot use the database ({reason}); check DATABASE_URL, then run `manage.py migrate`",
            returncode=SCHEMA_MISSING_EXIT,
        ) from None
    if missing:
        state = "has no tables yet" if fresh else f"lacks {len(missing)} migration(s) ({', '.join(missing[:5])})"
        raise CommandError(f"the database {state}: run `manage.py migrate` first", returncode=SCHEMA_MISSING_EXIT)
