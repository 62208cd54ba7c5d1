"""PostgreSQL restarted under a running gunicorn: a clean 503 meanwhile, service again after."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.faults.services import (
    ROOT,
    SERVER_PORTS,
    base_env,
    free_port,
    manage_command,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def request(url: str, *, token: str = "", method: str = "GET", body: dict | None = None) -> tuple[int, dict, str]:
    headers = {"Authorization": f"Token {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as response:
            status, raw, retry_after = response.status, response.read(), response.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        status, raw, retry_after = exc.code, exc.read(), exc.headers.get("Retry-After")
    text = raw.decode(errors="replace")
    try:
        payload = json.loads(text)
    except ValueError:
        payload = {}
    payload["_retry_after"] = retry_after
    return status, payload, text


@pytest.fixture
def served(pg, tmp_path):
    """gunicorn (DEBUG off, persistent connections with health checks, as deployed) on our own database."""
    env = base_env(tmp_path / "data", pg.url, DJANGO_DEBUG="0", DJANGO_SECRET_KEY="x" * 50,
                   DJANGO_ALLOWED_HOSTS="127.0.0.1", DJANGO_CONN_MAX_AGE="600",
                   AGENTRUNNER_SANDBOX="none")  # fmt: skip
    token = subprocess.run(
        manage_command("create_api_token", "alice"), env=env, capture_output=True, text=True, timeout=120
    )
    assert token.returncode == 0, token.stderr
    port = free_port(SERVER_PORTS)
    log = open(tmp_path / "gunicorn.log", "w+")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "agentrunner.wsgi", "-w", "2", "-b", f"127.0.0.1:{port}",
         "--timeout", "60"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        assert process.poll() is None, f"gunicorn exited: {Path(log.name).read_text()}"
        try:
            return request(base + "/api/health/")[0] in (200, 503)
        except OSError:
            return False

    wait_for(serving, timeout=60, message="gunicorn to answer")
    try:
        yield process, base, token.stdout.strip(), Path(log.name)
    finally:
        stop_process(process)
        log.close()


def test_requests_get_503_while_postgres_is_down_and_200_once_it_is_back(pg, served):
    process, base, token, log = served
    tasks = base + "/api/tasks/"
    # Both workers hold a persistent connection before the restart.
    for _ in range(6):
        assert request(tasks, token=token)[0] == 200

    pg.server.stop()
    try:
        for method, body in (("GET", None), ("POST", {"repository": "nope", "instructions": "x"})) * 3:
            status, payload, text = request(tasks, token=token, method=method, body=body)
            assert status == 503, text
            assert payload["code"] == "database_unavailable" and payload["detail"], text
            assert payload["_retry_after"] and int(payload["_retry_after"]) > 0
            assert "Traceback" not in text and "psycopg" not in text and "127.0.0.1" not in text
        # The health check says which part fails.
        status, payload, _ = request(base + "/api/health/")
        assert status == 503 and payload["checks"]["database"].startswith("failing")
    finally:
        pg.server.start()

    # The same server process serves again, without a restart: the first request after works.
    for _ in range(6):
        status, payload, text = request(tasks, token=token)
        assert status == 200, text
    assert process.poll() is None
    output = log.read_text()
    assert "Traceback" not in output, output
    assert "Booting worker" in output and output.count("Booting worker") == 2  # no worker was restarted


def test_a_quick_restart_is_invisible_to_clients(pg, served):
    """A restart between two requests: the dead persistent connection is dropped by the health
    check and a new one opened, so not even one request fails."""
    process, base, token, log = served
    tasks = base + "/api/tasks/"
    for _ in range(4):
        assert request(tasks, token=token)[0] == 200
    pg.server.stop()
    pg.server.start()
    for _ in range(6):
        status, _, text = request(tasks, token=token)
        assert status == 200, text
    created = request(tasks, token=token, method="POST", body={"repository": "nope", "instructions": "x"})
    assert created[0] == 400 and "Traceback" not in created[2]
