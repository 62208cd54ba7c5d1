"""The runner API over real HTTP (pytest-django's live server, a real socket): the whole
sequence with httpx, a streamed upload, and a long-poll claim that wakes for a new task."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid

import httpx2 as httpx
import pytest

from registry import services as registry
from registry.models import Task, TaskArtifact, TaskEvent
from repopool import services as pool
from runners import services as runners

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def http(live_server):
    _token, raw = runners.runner_token_create(name="http-host")
    with httpx.Client(base_url=f"{live_server.url}/api/runner/v1/", timeout=40,
                      headers={"Authorization": f"Bearer {raw}"}) as client:  # fmt: skip
        yield client


def _post(http, path, body=None, *, lease=None, key=True, **kwargs):
    headers = kwargs.pop("headers", {})
    if key:
        headers["Idempotency-Key"] = uuid.uuid4().hex
    if lease:
        headers["X-Lease-Token"] = lease
    return (
        http.post(path, json=body, headers=headers, **kwargs)
        if body is not None or "content" not in kwargs
        else (http.post(path, headers=headers, **kwargs))
    )


@pytest.fixture
def repo(make_repo):
    return pool.repository_create(name="sample", url=str(make_repo()), pool_size=1)


def test_whole_sequence_over_http(http, repo):
    task = registry.task_create(title="over http", instructions="fix", repository=repo)
    claimed = _post(http, "claim/", {"runner_id": "http:1"})
    assert claimed.status_code == 200, claimed.text
    a, lease = claimed.json()["attempt"]["id"], claimed.json()["attempt"]["lease_token"]
    assert _post(http, f"attempts/{a}/heartbeat/", {}, lease=lease, key=False).json()["cancel_requested"] is False
    assert (
        _post(http, f"attempts/{a}/events/", {"events": [{"type": "step", "message": "one"}]}, lease=lease).json()[
            "appended"
        ]
        == 1
    )
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "cost_usd": None}
    assert _post(http, f"attempts/{a}/usage/", usage, lease=lease).status_code == 200

    chunks = [bytes([i]) * 65536 for i in range(40)]  # 2.5 MiB, sent as a stream
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    upload = http.post(
        f"attempts/{a}/artifacts/",
        content=iter(chunks),
        headers={
            "Idempotency-Key": "upload-1",
            "X-Lease-Token": lease,
            "X-Content-SHA256": digest,
            "X-Artifact-Name": "big.bin",
            "X-Artifact-Kind": "file",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(sum(map(len, chunks))),
        },  # fmt: skip
    )
    assert upload.status_code == 201, upload.text
    assert upload.json()["sha256"] == digest and upload.json()["size"] == 40 * 65536
    link = _post(
        http, f"attempts/{a}/artifact-links/", {"artifact_id": upload.json()["id"], "role": "file"}, lease=lease
    )
    assert link.status_code == 201
    finish = _post(http, f"attempts/{a}/finish/", {"status": "succeeded", "message": "ok"}, lease=lease)
    assert finish.status_code == 200 and finish.json() == {"status": "succeeded"}

    task.refresh_from_db()
    assert (task.status, task.prompt_tokens, task.cost_unknown) == ("succeeded", 7, True)
    assert TaskEvent.objects.filter(task=task, type="step").count() == 1
    assert TaskArtifact.objects.filter(task=task, role="file").count() == 1
    late = _post(http, f"attempts/{a}/events/", {"events": [{"type": "late"}]}, lease=lease)
    assert late.status_code == 409 and late.json()["code"] == "lease_lost"


def test_long_poll_claim_wakes_when_a_task_is_created(http, repo):
    assert _post(http, "claim/", {"runner_id": "idle", "wait": 0}).status_code == 204

    created: dict[str, uuid.UUID] = {}

    def create_later():
        time.sleep(1.0)
        created["id"] = registry.task_create(title="late", instructions="x", repository=repo).pk

    threading.Thread(target=create_later, daemon=True).start()
    started = time.monotonic()
    response = _post(http, "claim/", {"runner_id": "waiter", "wait": 20})
    waited = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["task"]["id"] == str(created["id"])
    assert 0.9 <= waited < 5, waited  # woke for the task, long before the 20 s were up
    assert Task.objects.get(pk=created["id"]).status == "running"


def test_long_poll_claim_gives_up_after_wait(http, repo):
    started = time.monotonic()
    response = _post(http, "claim/", {"runner_id": "idle", "wait": 1.5})
    assert response.status_code == 204 and 1.4 <= time.monotonic() - started < 4
    too_long = _post(http, "claim/", {"runner_id": "idle", "wait": 31})
    assert too_long.status_code == 400 and "wait" in too_long.json()["errors"]
