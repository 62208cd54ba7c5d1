from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import pytest
from rest_framework.test import APIClient

from registry import services as registry
from repopool import services as pool
from runners import services as runners

API = "/api/runner/v1"


class RunnerClient:
    """A runner host's view of the API: bearer token, a fresh Idempotency-Key unless given."""

    def __init__(self, raw_token: str):
        self.raw_token = raw_token
        self.client = APIClient()
        self.client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_token}")

    def post(self, path: str, body=None, *, key: str | None = "", lease: str | None = None, **headers):
        extra = {f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()}
        if key == "":
            key = uuid.uuid4().hex
        if key is not None:
            extra["HTTP_IDEMPOTENCY_KEY"] = key
        if lease is not None:
            extra["HTTP_X_LEASE_TOKEN"] = lease
        return self.client.post(f"{API}/{path}", body if body is not None else {}, format="json", **extra)

    def upload(self, attempt_id: int, content: bytes, *, lease: str, key: str | None = "", sha256: str | None = None,
               name: str = "run.log", kind: str = "log", content_type: str = "text/plain",
               headers: dict[str, str] | None = None):  # fmt: skip
        extra = {
            **{f"HTTP_{name.upper().replace('-', '_')}": value for name, value in (headers or {}).items()},
            "HTTP_X_LEASE_TOKEN": lease,
            "HTTP_X_CONTENT_SHA256": sha256 if sha256 is not None else hashlib.sha256(content).hexdigest(),
            "HTTP_X_ARTIFACT_NAME": name,
            "HTTP_X_ARTIFACT_KIND": kind,
        }
        if key is not None:
            extra["HTTP_IDEMPOTENCY_KEY"] = uuid.uuid4().hex if key == "" else key
        return self.client.generic(
            "POST", f"{API}/attempts/{attempt_id}/artifacts/", content, content_type=content_type, **extra
        )


@dataclass
class Claimed:
    task_id: uuid.UUID
    attempt_id: int
    lease: str
    body: dict


@pytest.fixture
def runner_token(db):
    token, raw = runners.runner_token_create(name="host-a")
    return token, raw


@pytest.fixture
def runner(runner_token) -> RunnerClient:
    return RunnerClient(runner_token[1])


@pytest.fixture
def repo(db, make_repo):
    return pool.repository_create(name="sample", url=str(make_repo()), pool_size=1)


@pytest.fixture
def queued_task(repo):
    return registry.task_create(title="fix", instructions="fix add()", repository=repo)


def claim(runner: RunnerClient, **body) -> Claimed:
    response = runner.post("claim/", {"runner_id": "host-a:1", **body})
    assert response.status_code == 200, response.content
    data = response.json()
    return Claimed(uuid.UUID(data["task"]["id"]), data["attempt"]["id"], data["attempt"]["lease_token"], data)


@pytest.fixture
def claimed(runner, queued_task) -> Claimed:
    return claim(runner)
