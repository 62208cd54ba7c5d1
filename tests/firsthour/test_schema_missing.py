"""Every command that needs the schema says "run `manage.py migrate`" on a fresh database."""

from __future__ import annotations

import subprocess
import sys
import uuid
from urllib.parse import quote

import pytest
from django.db import connection

from tests.conftest import require_service
from tests.firsthour.helpers import ROOT, clean_env, manage

COMMANDS = [
    ["runagent", "--next"],
    ["runagent", "--repo", ".", "--instructions", "fix it"],
    ["demo"],
    ["create_api_token", "alice"],
    ["add_repository", "proj", "/srv/git/proj.git"],
    ["warm_pool", "proj"],
    ["reap_leases"],
    ["artifacts_gc"],
]


def assert_each_command_says_migrate(env: dict[str, str]) -> None:
    children = [
        (
            command,
            subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), *command],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),  # fmt: skip
        )
        for command in COMMANDS
    ]
    for command, child in children:
        out, err = child.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert child.returncode == 2, (command, out, err)
        assert len(lines) == 1 and "has no tables yet: run `manage.py migrate`" in lines[0], (command, err)
        assert "Traceback" not in err and out == "", (command, out)


@pytest.mark.slow
def test_on_a_fresh_sqlite_file(tmp_path):
    env = clean_env(tmp_path, OPENAI_API_KEY="sk-unused-0123456789")
    assert_each_command_says_migrate(env)
    migrated = manage("migrate", "--noinput", "-v", "0", env=env)
    assert migrated.returncode == 0, migrated.stderr
    token = manage("create_api_token", "alice", env=env)
    assert token.returncode == 0 and len(token.stdout.strip()) == 40


@pytest.mark.slow
def test_on_a_fresh_postgresql_database(tmp_path):
    require_service("PostgreSQL", connection.vendor == "postgresql", "set DATABASE_URL=postgres://...")
    import psycopg

    db = connection.settings_dict
    params = {"host": db.get("HOST") or "127.0.0.1", "port": db.get("PORT") or 5432, "user": db.get("USER") or ""}
    if db.get("PASSWORD"):
        params["password"] = db["PASSWORD"]
    name = f"ar_fresh_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        credentials = quote(params["user"]) + (f":{quote(params['password'])}" if "password" in params else "")
        url = f"postgres://{credentials}@{params['host']}:{params['port']}/{name}"
        assert_each_command_says_migrate(clean_env(tmp_path, DATABASE_URL=url, OPENAI_API_KEY="sk-unused-0123456789"))
        # One migration behind (an update pulled, migrate forgotten): named, same exit code.
        for target in ([], ["registry", "0002"]):  # migrated, then the newest registry migration undone
            done = manage("migrate", *target, "--noinput", "-v", "0", env=clean_env(tmp_path, DATABASE_URL=url))
            assert done.returncode == 0, done.stderr
        behind = manage("reap_leases", env=clean_env(tmp_path, DATABASE_URL=url))
        assert behind.returncode == 2 and "registry.0003_task_llm_config" in behind.stderr
        assert "run `manage.py migrate`" in behind.stderr
    finally:
        with psycopg.connect(dbname="postgres", autocommit=True, **params) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
