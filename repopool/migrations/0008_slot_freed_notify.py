"""PostgreSQL: a slot that becomes free (or broken: a remote host leases it again) or is deleted
notifies its repository's channel, in the transaction that changed it, with its host as payload.

The waiters of ``repopool.waiting`` listen there. A trigger, not a call in each service: every
path that frees a slot (release, return unchanged, reaping, force release, warm, the admin, a
bulk update) notifies, and the release stays one statement. SQLite has no NOTIFY: nothing here.
"""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION repopool_slot_freed_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed repopool_slot;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
    ELSE
        changed := NEW;
    END IF;
    -- The channel's name is repopool.waiting.channel(); identical notifications of one
    -- transaction are folded into one by PostgreSQL.
    PERFORM pg_notify('repopool_slot_freed_' || changed.repository_id, changed.host);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS repopool_slot_freed ON repopool_slot;
CREATE TRIGGER repopool_slot_freed AFTER UPDATE OF state ON repopool_slot FOR EACH ROW
    WHEN (NEW.state IN ('free', 'broken') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION repopool_slot_freed_notify();
DROP TRIGGER IF EXISTS repopool_slot_deleted ON repopool_slot;
CREATE TRIGGER repopool_slot_deleted AFTER DELETE ON repopool_slot FOR EACH ROW
    EXECUTE FUNCTION repopool_slot_freed_notify();
"""

DROP = """
DROP TRIGGER IF EXISTS repopool_slot_freed ON repopool_slot;
DROP TRIGGER IF EXISTS repopool_slot_deleted ON repopool_slot;
DROP FUNCTION IF EXISTS repopool_slot_freed_notify();
"""


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [
        ("repopool", "0007_slot_needs_reset"),
    ]

    operations = [migrations.RunPython(create, drop)]
