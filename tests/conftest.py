from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from django.db import connection
from rest_framework.test import APIClient

REQUIRE_SERVICES = os.environ.get("AGENTRUNNER_REQUIRE_SERVICES") == "1"

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_COMMITTER_NAME": "Test Author",
    "GIT_COMMITTER_EMAIL": "author@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/tmp",
}


def require_service(name: str, available: bool, how: str) -> None:
    """Skip (with the reason printed) when a service is not configured; fail instead in CI."""
    if available:
        return
    message = f"{name} not configured: {how}"
    if REQUIRE_SERVICES:
        pytest.fail(f"AGENTRUNNER_REQUIRE_SERVICES=1 but {message}")
    pytest.skip(message)


@pytest.fixture
def require_postgres():
    require_service("PostgreSQL", connection.vendor == "postgresql", "set DATABASE_URL=postgres://...")


def run_git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def processes_running(argv: list[str]) -> list[int]:
    """Pids on the host whose command line is exactly ``argv``."""
    wanted = b"\0".join(a.encode() for a in argv) + b"\0"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if fh.read() == wanted:
                    found.append(int(pid))
        except OSError:
            pass
    return found


def until(condition, timeout: float = 10) -> None:
    """Wait (polling every 10 ms) for ``condition()`` to hold; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the condition"
        time.sleep(0.01)


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


SAMPLE_PROJECT = {
    "calc.py": "def add(a, b):\n    return a - b\n",
    "test_calc.py": "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
    ".gitignore": "__pycache__/\n*.pyc\n.venv/\nbuild/\n",
    "README.md": "# sample\n",
}


@pytest.fixture
def make_repo(tmp_path):
    """Create a real git repository (branch main) with the given files committed."""
    counter = {"n": 0}

    def make(files: dict[str, str] | None = None, *, name: str | None = None) -> Path:
        counter["n"] += 1
        path = tmp_path / "origin" / (name or f"repo{counter['n']}")
        path.mkdir(parents=True)
        run_git(path, "init", "-q", "-b", "main")
        write_files(path, SAMPLE_PROJECT if files is None else files)
        run_git(path, "add", "-A")
        run_git(path, "commit", "-q", "-m", "initial")
        return path

    return make


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Users made in tests need no slow key stretching; production keeps Django's default."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path, settings):
    """Every test gets its own data folder (pool, results, artifacts, spool, tmp)."""
    data = tmp_path / "data"
    settings.DATA_DIR = data
    settings.REPO_POOL_ROOT = data / "pool"
    settings.RESULTS_ROOT = data / "results"
    settings.ARTIFACTS_ROOT = data / "artifacts"
    settings.SPOOL_ROOT = data / "spool"
    settings.TMP_ROOT = data / "tmp"
    settings.FILE_UPLOAD_TEMP_DIR = str(data / "tmp")
    settings.AGENTRUNNER_AUTO_ENQUEUE = False  # the Celery tests turn it on
    storages = dict(settings.STORAGES)
    if storages["artifacts"]["BACKEND"].endswith("FileSystemStorage"):
        storages["artifacts"] = {
            **storages["artifacts"],
            "OPTIONS": {"location": str(data / "artifacts"), "allow_overwrite": True},
        }
    settings.STORAGES = storages
    for folder in ("pool", "results", "artifacts", "spool", "tmp"):
        (data / folder).mkdir(parents=True, exist_ok=True)
    return data


@pytest.fixture
def user(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user(username="alice", password="pw-alice-123")


@pytest.fixture
def api(user):
    from rest_framework.authtoken.models import Token

    client = APIClient()
    token = Token.objects.create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def staff_api(db):
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    staff = get_user_model().objects.create_user(
        username="root", password="pw-root-123", is_staff=True, is_superuser=True
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=staff).key}")
    client.user = staff
    return client


@pytest.fixture
def repository(db, make_repo):
    from repopool import services

    return services.repository_create(name="sample", url=str(make_repo()), pool_size=2, keep_paths=[".venv"])


@pytest.fixture
def git_runs(tmp_path, monkeypatch):
    """A ``git`` first on PATH that logs each command line, then runs the real one."""
    real = shutil.which("git")
    shims = tmp_path / "shims"
    shims.mkdir()
    log = tmp_path / "git-runs.log"
    log.touch()
    (shims / "git").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    (shims / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}:{Path(real).parent}:/usr/bin:/bin")

    def runs(since: int = 0) -> list[str]:
        return log.read_text().splitlines()[since:]

    return runs
