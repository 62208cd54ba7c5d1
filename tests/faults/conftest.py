"""Fixtures of the fault tests: PostgreSQL and Redis of our own, migrated once per session."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.faults.services import SCRATCH, OwnPostgres, OwnRedis, base_env, manage_command
from tests.llm_server import LLMServer

API_KEY = "sk-faults-secret-0123456789abcdef"
TEMPLATE_DB = "ar_faults_template"


@pytest.fixture(scope="session")
def own_postgres():
    """A PostgreSQL cluster of this suite with a migrated template database."""
    server = OwnPostgres()
    try:
        server.start()
        url = server.createdb(TEMPLATE_DB)
        data = SCRATCH / f"migrate-{uuid.uuid4().hex[:8]}"
        migrated = subprocess.run(
            manage_command("migrate", "--noinput", "-v", "0"),
            env=base_env(data, url),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert migrated.returncode == 0, migrated.stderr
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg(own_postgres):
    """A fresh migrated database on our own cluster (running): ``pg.url``, ``pg.query(sql)``."""
    if not own_postgres.running():
        own_postgres.start()
    name = f"ar_faults_{uuid.uuid4().hex[:10]}"
    url = own_postgres.createdb(name, template=TEMPLATE_DB)

    class Database:
        server = own_postgres
        dbname = name

        def __init__(self):
            self.url = url

        def query(self, sql: str, *params):
            return own_postgres.query(name, sql, *params)

        def value(self, sql: str, *params):
            rows = own_postgres.query(name, sql, *params)
            return rows[0][0] if rows else None

    yield Database()
    if not own_postgres.running():
        own_postgres.start()


@pytest.fixture
def own_redis():
    server = OwnRedis()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def llm():
    server = LLMServer(api_key=API_KEY).start()
    yield server
    server.stop()
