"""The runner API served by gunicorn as deployed (``make serve``: gthread workers): a long-poll
claim holds one thread while the others answer, and wakes when a task is created; a streamed upload and the
finish go through; a replayed finish changes nothing."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import threading
import time
import uuid

import httpx2 as httpx
import pytest
from django.db import connection

from registry import services as registry
from registry.models import Task
from repopool import services as pool
from runners import services as runners
from tests.firsthour.helpers import ROOT, VENV_BIN, clean_env, stop, wait_until_serving

pytestmark = pytest.mark.django_db(transaction=True)


def _port() -> int:
    for port in range(18200, 18300):  # this branch's range of ports
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 18200-18299")


@pytest.fixture
def gunicorn(tmp_path, require_postgres):
    env = clean_env(tmp_path / "served")
    settings = connection.settings_dict
    env["DATABASE_URL"] = f"postgres://{settings['USER']}@{settings['HOST']}:{settings['PORT']}/{settings['NAME']}"
    port = _port()
    process = subprocess.Popen(
        [str(VENV_BIN / "gunicorn"), "agentrunner.wsgi", "-k", "gthread", "-w", "2", "--threads", "8"]
        + ["-b", f"127.0.0.1:{port}", "--timeout", "60"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base + "/api/health/", process)
        yield base
    finally:
        stop(process)


def test_runner_api_under_gunicorn(gunicorn, make_repo):
    repo = pool.repository_create(name="sample", url=str(make_repo()), pool_size=1)
    _token, raw = runners.runner_token_create(name="gunicorn-host")
    client = httpx.Client(base_url=f"{gunicorn}/api/runner/v1/", headers={"Authorization": f"Bearer {raw}"}, timeout=30)

    def post(path, body=None, *, key=None, lease=None, **kwargs):
        headers = {"Idempotency-Key": key or uuid.uuid4().hex, **kwargs.pop("headers", {})}
        if lease:
            headers["X-Lease-Token"] = lease
        return client.post(path, json=body, headers=headers, **kwargs)

    claimed: dict = {}

    def long_poll():
        started = time.monotonic()
        response = post("claim/", {"runner_id": "g:1", "wait": 20})
        claimed.update(response=response, waited=time.monotonic() - started)

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.5)
    started = time.monotonic()
    host = post("hosts/", {"name": "g-host", "capacity": {"sample": 1}})
    assert host.status_code == 200 and time.monotonic() - started < 3  # the other worker answered
    task = registry.task_create(title="served", instructions="x", repository=repo)
    poller.join(25)
    response = claimed["response"]
    assert response.status_code == 200, response.text
    assert response.json()["task"]["id"] == str(task.pk) and claimed["waited"] < 10

    attempt = response.json()["attempt"]
    a, lease = attempt["id"], attempt["lease_token"]
    assert post(f"attempts/{a}/events/", {"events": [{"type": "step"}] * 3}, lease=lease).json()["appended"] == 3
    content = b"0123456789abcdef" * 65536  # 1 MiB, streamed in chunks
    upload = client.post(
        f"attempts/{a}/artifacts/",
        content=(content[i : i + 100_000] for i in range(0, len(content), 100_000)),
        headers={
            "Idempotency-Key": "g-up",
            "X-Lease-Token": lease,
            "Content-Length": str(len(content)),
            "X-Content-SHA256": hashlib.sha256(content).hexdigest(),
            "X-Artifact-Kind": "log",
            "Content-Type": "text/plain",
        },  # fmt: skip
    )
    assert upload.status_code == 201, upload.text
    assert upload.json()["size"] == len(content)
    finish = post(f"attempts/{a}/finish/", {"status": "succeeded"}, key="g-fin", lease=lease)
    replay = post(f"attempts/{a}/finish/", {"status": "succeeded"}, key="g-fin", lease=lease)
    assert finish.status_code == replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert Task.objects.get(pk=task.pk).status == "succeeded"
    assert Task.objects.get(pk=task.pk).events.filter(type="status", data__to="succeeded").count() == 1
    # Outside the runner API the token is refused, by the same server.
    assert httpx.get(f"{gunicorn}/api/tasks/", headers={"Authorization": f"Bearer {raw}"}).status_code == 401
    client.close()
