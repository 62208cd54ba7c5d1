"""Fixtures of the integration suite: one deployment per session (ours, or the one the environment
names: see deployment.py), a client per service, git repositories registered through the API."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_PROJECT, require_service, run_git, write_files
from tests.integration.deployment import Deployment, expect, from_environment, start_local, stop_local
from tests.integration.runner_api import RunnerAPI

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    """Every test of this folder is an integration test (`pytest -m integration` selects them)."""
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


_MEASUREMENTS: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if _MEASUREMENTS:
        terminalreporter.section("integration measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)


@pytest.fixture
def report(capsys):
    """Print a measurement now (even under capture) and again in the session's summary."""

    def say(line: str) -> None:
        _MEASUREMENTS.append(line)
        with capsys.disabled():
            print(f"\n[measured] {line}")

    return say


@pytest.fixture(scope="session")
def deployment(tmp_path_factory) -> Deployment:
    deployed = from_environment()
    if deployed is not None:
        yield deployed
        deployed.close()
        return
    database_url = os.environ.get("DATABASE_URL", "")
    if not database_url.startswith(("postgres://", "postgresql://")):
        require_service("PostgreSQL", False, "set DATABASE_URL=postgres://... (the suite makes a database beside it)")
    workdir = tmp_path_factory.mktemp("integration-server")
    broker = os.environ.get("CELERY_BROKER_URL", "")
    ours, server = start_local(workdir, database_url=database_url, broker_url=broker)
    try:
        yield ours
    finally:
        ours.close()
        if server.process.poll() is not None:  # it died under the tests: say why
            print(f"gunicorn exited with {server.process.returncode}:\n{server.log_tail()}")
        stop_local(server, workdir)


@pytest.fixture
def registry(deployment):
    """The task registry as a staff user sees it."""
    client = deployment.client("registry")
    yield client
    client.close()


@pytest.fixture
def pool(deployment):
    """The repo pool as a staff user sees it."""
    client = deployment.client("pool")
    yield client
    client.close()


@pytest.fixture
def store(deployment):
    """The artifact store as a staff user sees it."""
    client = deployment.client("artifacts")
    yield client
    client.close()


@pytest.fixture
def runner_api(deployment):
    """The runner API as a runner host (runner token) reaches it, each service at its own URL."""
    api = RunnerAPI(deployment)
    yield api
    api.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_repository(deployment, pool):
    """Make a git repository (branch main) where the server may read it and register it through
    the API; returns the repository as the API answered it."""

    def make(files: dict[str, str] | None = None, **fields) -> dict:
        name = fields.pop("name", None) or unique("it")
        path = deployment.repo_root / name
        path.mkdir(parents=True)
        run_git(path, "init", "-q", "-b", "main")
        write_files(path, SAMPLE_PROJECT if files is None else files)
        run_git(path, "add", "-A")
        run_git(path, "commit", "-q", "-m", "initial")
        body = {"name": name, "url": str(path), "pool_size": 1, **fields}
        return expect(pool.post("/api/repositories/", json=body), 201)

    return make


@pytest.fixture
def repository(make_repository) -> dict:
    return make_repository()


@pytest.fixture
def make_task(registry, repository):
    """Create a task through the user API; whatever of it is left unfinished is cancelled at the
    end, so a deployed instance's queue is left as it was found."""
    made: list[str] = []

    def make(**fields) -> dict:
        body = {"repository": repository["name"], "instructions": "make add() add", "title": unique("task"), **fields}
        task = expect(registry.post("/api/tasks/", json=body), 201)
        made.append(task["id"])
        return task

    yield make
    cancel_unfinished(registry, made)


def cancel_unfinished(registry, task_ids) -> None:
    for task_id in task_ids:
        response = registry.post(f"/api/tasks/{task_id}/cancel/")
        assert response.status_code in (200, 409), response.text  # 409: it had finished
