"""The runner API's slot long poll waits in the pool's line (PostgreSQL): a release wakes it at once
and the waiters are served in arrival order; a wait that runs out is a 503 that leaves nothing behind."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from repopool import waiting
from tests.conftest import until
from tests.runners.conftest import RunnerClient

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("require_postgres")]


@pytest.fixture
def host(runner, repo):
    assert runner.post("hosts/", {"name": "box-w", "capacity": {"sample": 1}, "version": "t"}).status_code == 200
    return runner


def allocate(runner: RunnerClient, repo, holder: str, wait: float = 0):
    return runner.post("slots/allocate/", {"repository_id": repo.pk, "holder": holder, "wait_seconds": wait})


def release(runner: RunnerClient, slot: dict):
    answer = runner.post(f"slots/{slot['id']}/release/", {"token": slot["token"], "commit": ""})
    assert answer.status_code == 200, answer.content


def line_of(repo) -> tuple[int, int]:
    return waiting.line_of(repo.pk, "box-w")


def test_the_long_poll_is_woken_by_a_release_in_arrival_order(host, repo, runner_token, monkeypatch):
    monkeypatch.setattr(waiting, "RECHECK_SECONDS", 30.0)  # only the release's notification wakes them
    held = allocate(host, repo, "holder").json()["slot"]
    raw = runner_token[1]
    served: list[tuple[str, float]] = []
    errors: list[str] = []

    def wait_for_slot(name: str) -> None:
        try:
            me = RunnerClient(raw)  # a runner thread of its own, a server thread of its own
            answer = allocate(me, repo, name, wait=20)
            if answer.status_code != 200:
                errors.append(f"{name}: {answer.status_code} {answer.content[:200]!r}")
                return
            served.append((name, time.monotonic()))
            release(me, answer.json()["slot"])
        finally:
            connection.close()

    threads = []
    for n, name in enumerate(["first", "second"]):
        threads.append(threading.Thread(target=wait_for_slot, args=(name,)))
        threads[-1].start()
        until(lambda n=n: line_of(repo) == (1, n))
    time.sleep(0.3)
    released_at = time.monotonic()
    release(host, held)
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert [name for name, _ in served] == ["first", "second"]
    assert served[0][1] - released_at < 0.5
    assert line_of(repo) == (0, 0)


def test_a_long_poll_that_runs_out_is_a_503_with_nothing_left_behind(host, repo):
    allocate(host, repo, "holder")
    started = time.monotonic()
    answer = allocate(host, repo, "late", wait=0.5)
    assert answer.status_code == 503 and answer.json()["code"] == "no_slot"
    assert time.monotonic() - started >= 0.5
    with connection.cursor() as cursor:  # the test client ran the view on this thread's connection
        cursor.execute("SELECT pg_listening_channels()")
        assert cursor.fetchall() == []
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
        assert cursor.fetchone()[0] == 0
