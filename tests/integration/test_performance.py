"""Health and response time of each service, and throughput: measured and printed. Only a loose
bound is asserted (a request taking seconds is a defect, not noise); speed targets live in bench/."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.conftest import cancel_unfinished
from tests.integration.deployment import expect
from tests.integration.runner_api import RunnerAPI

SAMPLES = 20


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[max(0, round(len(ordered) * 0.95) - 1)]
    return f"median {statistics.median(ordered) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, n={len(ordered)}"


def test_response_time_of_each_service(deployment, make_task, report):
    task = make_task()
    registry, pool, store = (deployment.client(s) for s in ("registry", "pool", "artifacts"))
    artifact = expect(store.post("/api/artifacts/", params={"name": "r.txt", "kind": "log"}, content=b"x" * 4096), 201)
    calls = {
        "registry GET /api/health/": lambda: expect(registry.get("/api/health/"), 200),
        "registry GET /api/tasks/": lambda: expect(registry.get("/api/tasks/"), 200),
        "registry GET /api/tasks/<id>/": lambda: expect(registry.get(f"/api/tasks/{task['id']}/"), 200),
        "registry GET /api/tasks/<id>/events/": lambda: expect(registry.get(f"/api/tasks/{task['id']}/events/"), 200),
        "pool GET /api/slots/": lambda: expect(pool.get("/api/slots/"), 200),
        "artifacts GET /api/artifacts/<id>/content/": lambda: store.get(
            f"/api/artifacts/{artifact['id']}/content/"
        ).raise_for_status(),
    }
    for name, call in calls.items():
        call()  # warm: the first request to a worker imports what it needs
        samples = [timed(call) for _ in range(SAMPLES)]
        report(f"{name}: {summary(samples)}")
        assert max(samples) < 2.0, f"{name}: a request took {max(samples):.2f}s"


@pytest.mark.performance
@pytest.mark.slow
def test_throughput_of_reads_and_writes(deployment, repository, report):
    registry = deployment.client("registry")
    local = threading.local()

    def client():
        if not hasattr(local, "client"):
            local.client = deployment.client("registry")
        return local.client

    def create(n: int) -> dict:
        body = {"repository": repository["name"], "instructions": f"throughput {n}", "title": f"tp-{n}"}
        return expect(client().post("/api/tasks/", json=body), 201)

    def read(task_id: str) -> dict:
        return expect(client().get(f"/api/tasks/{task_id}/"), 200)

    writes, reads, threads = 60, 300, 8
    with ThreadPoolExecutor(max_workers=threads) as workers:
        started = time.perf_counter()
        created = list(workers.map(create, range(writes)))
        write_seconds = time.perf_counter() - started
        ids = [task["id"] for task in created]
        started = time.perf_counter()
        fetched = list(workers.map(read, (ids[n % len(ids)] for n in range(reads))))
        read_seconds = time.perf_counter() - started
    report(f"throughput, {threads} clients: task create {writes / write_seconds:.0f} req/s ({writes} requests)")
    report(f"throughput, {threads} clients: task get {reads / read_seconds:.0f} req/s ({reads} requests)")
    assert len({t["id"] for t in created}) == writes and len(fetched) == reads
    listed = expect(registry.get("/api/tasks/", params={"repository": repository["name"], "page_size": 500}), 200)
    assert listed["count"] == writes
    cancel_unfinished(registry, ids)


@pytest.mark.performance
@pytest.mark.slow
def test_throughput_of_runner_event_appends(deployment, runner_api, make_task, report):
    """Events as a busy runner sends them, one call each (the runner's client batches; this is the
    worst case): N requests from several threads to one attempt, each landing once and in order."""
    task = make_task()
    claimed = runner_api.claim(runner_id="it-throughput", task_id=task["id"])
    local = threading.local()

    def send(n: int) -> dict:
        if not hasattr(local, "api"):
            local.api = RunnerAPI(deployment)
        event = {"type": "agent_step", "message": f"tp {n}", "data": {"n": n}}
        return expect(local.api.events(claimed, [event]), 200)

    requests, threads = 200, 8
    with ThreadPoolExecutor(max_workers=threads) as workers:
        started = time.perf_counter()
        replies = list(workers.map(send, range(requests)))
        seconds = time.perf_counter() - started
    report(f"throughput, {threads} clients: runner event append {requests / seconds:.0f} req/s ({requests} requests)")
    expect(runner_api.finish(claimed, "succeeded"), 200)
    assert len({reply["last_seq"] for reply in replies}) == requests  # each got a sequence number of its own
    events = expect(deployment.client("registry").get(f"/api/tasks/{task['id']}/events/", params={"limit": 1000}), 200)
    assert sorted(e["data"]["n"] for e in events if e["type"] == "agent_step") == list(range(requests))
