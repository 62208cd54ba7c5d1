"""The task registry over HTTP: health, tasks, status changes, the event log, artifact records."""

from __future__ import annotations

import hashlib
import time

from tests.integration.conftest import unique
from tests.integration.deployment import expect


def test_health_answers_ok_quickly(deployment, report):
    for service in ("registry", "pool", "artifacts"):
        client = deployment.client(service, token="")  # health needs no credentials
        started = time.perf_counter()
        body = expect(client.get("/api/health/"), 200)
        elapsed = time.perf_counter() - started
        report(f"{service} health: {elapsed * 1000:.1f} ms ({client.url})")
        assert body["status"] == "ok"
        assert body["checks"]["database"] == "ok" and body["checks"]["storage"] == "ok"
        assert elapsed < 2.0, f"{service} health took {elapsed:.2f}s"


def test_task_create_list_get(registry, repository):
    title = unique("create")
    created = expect(
        registry.post(
            "/api/tasks/",
            json={"repository": repository["name"], "instructions": "make add() add", "title": title, "priority": 7},
        ),
        201,
    )
    assert created["status"] == "queued" and created["repository"] == repository["name"]
    assert created["priority"] == 7 and created["base_ref"] == "main"

    fetched = expect(registry.get(f"/api/tasks/{created['id']}/"), 200)
    assert fetched["id"] == created["id"] and fetched["title"] == title

    listed = expect(registry.get("/api/tasks/", params={"repository": repository["name"]}), 200)
    assert [t["id"] for t in listed["results"]] == [created["id"]]
    queued = expect(registry.get("/api/tasks/", params={"repository": repository["name"], "status": "queued"}), 200)
    assert queued["count"] == 1


def test_task_create_refuses_bad_input_with_field_and_reason(registry, repository):
    refused = registry.post("/api/tasks/", json={"repository": repository["name"], "instructions": "  "})
    body = expect(refused, 400)
    assert "instructions" in body["errors"]
    unknown = expect(registry.post("/api/tasks/", json={"repository": unique("nope"), "instructions": "x"}), 400)
    assert "repository" in unknown["errors"]
    assert expect(registry.get("/api/tasks/00000000-0000-0000-0000-000000000000/"), 404)["code"]


def test_cancel_and_retry_through_the_user_api(registry, make_task):
    task = make_task()
    cancelled = expect(registry.post(f"/api/tasks/{task['id']}/cancel/"), 200)
    assert cancelled["status"] == "cancelled" and cancelled["failure_reason"] == "cancelled"
    again = registry.post(f"/api/tasks/{task['id']}/cancel/")
    assert again.status_code == 409 and "cancel" in again.json()["detail"]
    retried = expect(registry.post(f"/api/tasks/{task['id']}/retry/"), 200)
    assert retried["status"] == "queued" and retried["failure_reason"] == ""
    refused = registry.post(f"/api/tasks/{task['id']}/retry/")
    assert refused.status_code == 409 and "retry" in refused.json()["detail"]
    events = expect(registry.get(f"/api/tasks/{task['id']}/events/"), 200)
    assert events[0]["type"] == "created"
    moves = [(e["data"]["from"], e["data"]["to"]) for e in events if e["type"] == "status"]
    assert moves[-3:] == [("queued", "cancelled"), ("cancelled", "pending"), ("pending", "queued")], moves


def test_event_log_reads_in_order_after_a_sequence_number(registry, make_task):
    task = make_task()
    for _ in range(3):
        expect(registry.post(f"/api/tasks/{task['id']}/cancel/"), 200)
        expect(registry.post(f"/api/tasks/{task['id']}/retry/"), 200)
    events = expect(registry.get(f"/api/tasks/{task['id']}/events/"), 200)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and len(seqs) >= 7
    tail = expect(registry.get(f"/api/tasks/{task['id']}/events/", params={"after": seqs[2]}), 200)
    assert [e["seq"] for e in tail] == seqs[3:]
    assert expect(registry.get(f"/api/tasks/{task['id']}/events/", params={"after": -1}), 400)["errors"]


def test_artifact_uploaded_for_a_task_is_listed_on_it(registry, store, make_task):
    task = make_task()
    content = b"collected 3 items\n3 passed\n"
    uploaded = expect(
        store.post(
            "/api/artifacts/",
            params={"name": "report.txt", "kind": "test_report", "task": task["id"]},
            content=content,
            headers={"Content-Type": "text/plain", "X-Content-SHA256": hashlib.sha256(content).hexdigest()},
        ),
        201,
    )
    assert uploaded["sha256"] == hashlib.sha256(content).hexdigest() and uploaded["size"] == len(content)
    links = expect(registry.get(f"/api/tasks/{task['id']}/artifacts/"), 200)
    assert [(a["id"], a["kind"], a["name"]) for a in links] == [(uploaded["id"], "test_report", "report.txt")]
    by_task = expect(store.get("/api/artifacts/", params={"task": task["id"]}), 200)
    assert [a["id"] for a in by_task["results"]] == [uploaded["id"]]
