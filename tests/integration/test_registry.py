"""The task registry over HTTP: health, tasks, status changes, the event log, artifact records."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from tests.integration.conftest import cancel_unfinished, unique
from tests.integration.deployment import expect
from tests.integration.runner_api import Claimed


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
    cancel_unfinished(registry, [created["id"]])


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


# --- status changes, events and artifacts through the runner API ---------------------------------
def test_runner_claims_heartbeats_and_finishes_a_task(registry, runner_api, make_task):
    task = make_task()
    claimed = runner_api.claim(runner_id="it-runner-1", task_id=task["id"])
    assert claimed is not None and claimed.task_id == task["id"] and claimed.number == 1 and claimed.lease_token
    running = expect(registry.get(f"/api/tasks/{task['id']}/"), 200)
    assert running["status"] == "running" and running["attempts_count"] == 1

    beat = expect(runner_api.heartbeat(claimed, metrics={"phase": "agent"}), 200)
    assert beat == {"cancel_requested": False, "attempt_status": "running"}
    expect(runner_api.usage(claimed, prompt=1200, completion=300, cost="0.0125"), 200)
    finished = expect(runner_api.finish(claimed, "succeeded", message="done", result={"summary": "added"}), 200)
    assert finished["status"] == "succeeded"

    done = expect(registry.get(f"/api/tasks/{task['id']}/"), 200)
    assert (done["status"], done["prompt_tokens"], done["completion_tokens"]) == ("succeeded", 1200, 300)
    assert done["finished_at"] and done["failure_reason"] == ""
    attempts = expect(registry.get(f"/api/tasks/{task['id']}/attempts/"), 200)
    assert [a["number"] for a in attempts] == [1]
    # The attempt is over: every attempt-scoped call is fenced out and changes nothing.
    late = runner_api.heartbeat(claimed)
    assert late.status_code == 409 and late.json()["code"] == "lease_lost"
    assert runner_api.finish(claimed, "failed", failure_reason="tests_failed").status_code == 409
    assert expect(registry.get(f"/api/tasks/{task['id']}/"), 200)["status"] == "succeeded"


def test_claim_of_a_task_that_is_not_runnable_is_refused(runner_api, registry, make_task):
    task = make_task()
    expect(registry.post(f"/api/tasks/{task['id']}/cancel/"), 200)
    refused = runner_api.claim_response(runner_id="it-runner", task_id=task["id"])
    assert refused.status_code == 409 and "claim" in refused.json()["detail"]
    assert expect(registry.get(f"/api/tasks/{task['id']}/"), 200)["attempts_count"] == 0


def test_a_waiting_claim_gets_the_task_that_becomes_runnable(deployment, registry, runner_api, make_task):
    """Long-poll: a claim with `wait` answers as soon as a task becomes runnable (here: when its
    dependency succeeds), and 204 when none did within the wait."""
    queued = expect(registry.get("/api/tasks/", params={"status": "queued"}), 200)["count"]
    if queued and deployment.mode == "deployed":  # our own server's queue holds only this test's tasks
        pytest.skip(f"the deployed instance has {queued} queued tasks: a claim of the next task would take one")
    assert queued == 0, "the suite's tests leave no task queued"
    assert runner_api.claim_response(runner_id="it-poll", wait=0.5).status_code == 204
    first = make_task()
    second = make_task(depends_on=[first["id"]])
    assert second["status"] == "pending"
    running = runner_api.claim(runner_id="it-poll", task_id=first["id"])
    answered = {}

    def wait_for_work():
        started = time.monotonic()
        answered["response"] = runner_api.claim_response(runner_id="it-poll-2", wait=20)
        answered["seconds"] = time.monotonic() - started

    waiter = threading.Thread(target=wait_for_work)
    waiter.start()
    expect(runner_api.finish(running, "succeeded"), 200)
    waiter.join(timeout=60)
    got = Claimed.from_body(expect(answered["response"], 200))
    assert got.task_id == second["id"] and answered["seconds"] < 15
    expect(runner_api.finish(got, "succeeded"), 200)


def test_user_cancel_reaches_the_runner_and_retry_runs_the_task_again(registry, runner_api, make_task):
    task = make_task()
    first = runner_api.claim(runner_id="it-runner", task_id=task["id"])
    assert expect(registry.post(f"/api/tasks/{task['id']}/cancel/"), 200)["cancel_requested"] is True
    beat = expect(runner_api.heartbeat(first), 200)
    assert beat["cancel_requested"] is True
    ended = expect(runner_api.finish(first, "cancelled", failure_reason="cancelled", message="stopped on request"), 200)
    assert ended["status"] == "cancelled"
    assert expect(registry.post(f"/api/tasks/{task['id']}/retry/"), 200)["status"] == "queued"
    second = runner_api.claim(runner_id="it-runner", task_id=task["id"])
    assert second.number == 2 and second.lease_token != first.lease_token
    # The first attempt's token does not reach the second attempt.
    assert runner_api.heartbeat(second, lease=first.lease_token).status_code == 409
    expect(runner_api.finish(second, "failed", failure_reason="tests_failed", message="still red"), 200)
    failed = expect(registry.get(f"/api/tasks/{task['id']}/"), 200)
    assert (failed["status"], failed["failure_reason"], failed["attempts_count"]) == ("failed", "tests_failed", 2)


def test_a_retryable_failure_puts_the_task_back_in_the_queue(registry, runner_api, make_task):
    task = make_task(max_attempts=2)
    claimed = runner_api.claim(runner_id="it-runner", task_id=task["id"])
    expect(runner_api.finish(claimed, "failed", failure_reason="workspace_error", message="no slot", retry=True), 200)
    again = expect(registry.get(f"/api/tasks/{task['id']}/"), 200)
    assert again["status"] == "queued" and again["attempts_count"] == 1


def test_events_are_appended_in_batches_in_order_and_fenced(registry, runner_api, make_task):
    task = make_task()
    claimed = runner_api.claim(runner_id="it-runner", task_id=task["id"])
    before = expect(registry.get(f"/api/tasks/{task['id']}/events/"), 200)
    first = [{"type": "agent_step", "message": f"step {n}", "data": {"n": n}} for n in range(200)]
    second = [{"type": "test_run", "message": f"run {n}", "data": {"n": 200 + n}} for n in range(50)]
    appended = expect(runner_api.events(claimed, first), 200)
    assert appended["appended"] == 200
    last = expect(runner_api.events(claimed, second), 200)
    assert last["appended"] == 50 and last["last_seq"] == appended["last_seq"] + 50
    # A runner holding a wrong lease token appends nothing.
    fenced = runner_api.events(claimed, [{"type": "agent_step", "message": "intruder", "data": {}}], lease="x" * 43)
    assert fenced.status_code == 409 and fenced.json()["code"] == "lease_lost"
    assert expect(runner_api.events(claimed, []), 400)["errors"]

    events = expect(registry.get(f"/api/tasks/{task['id']}/events/", params={"after": before[-1]["seq"]}), 200)
    ours = [e for e in events if e["type"] in ("agent_step", "test_run")]
    assert [e["data"]["n"] for e in ours] == list(range(250))
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no duplicate
    assert "intruder" not in [e["message"] for e in events]
    expect(runner_api.finish(claimed, "succeeded"), 200)
    after_finish = runner_api.events(claimed, [{"type": "agent_step", "message": "late", "data": {}}])
    assert after_finish.status_code == 409


def test_an_artifact_a_runner_uploads_and_links_is_listed_on_the_task(registry, store, runner_api, make_task):
    task = make_task()
    claimed = runner_api.claim(runner_id="it-runner", task_id=task["id"])
    patch = b"From 0000 Mon Sep 17 00:00:00 2001\nSubject: [PATCH] add\n\n--- a/calc.py\n+++ b/calc.py\n"
    stored = expect(
        runner_api.upload(claimed, patch, name="0001-add.patch", kind="patch", content_type="text/x-patch"), 201
    )
    assert (stored["sha256"], stored["size"]) == (hashlib.sha256(patch).hexdigest(), len(patch))
    expect(runner_api.link(claimed, stored["id"], "patch"), 201)
    expect(runner_api.finish(claimed, "succeeded"), 200)
    listed = expect(registry.get(f"/api/tasks/{task['id']}/artifacts/"), 200)
    assert [(a["id"], a["name"], a["kind"]) for a in listed] == [(stored["id"], "0001-add.patch", "patch")]
    assert store.get(f"/api/artifacts/{stored['id']}/content/").content == patch


def test_runner_and_user_tokens_each_stay_on_their_side(deployment, registry, runner_api, make_task):
    task = make_task()
    as_user = registry.post("/api/runner/v1/claim/", json={"runner_id": "x", "task_id": task["id"]},
                            headers={"Idempotency-Key": "it-user-claim"})  # fmt: skip
    assert as_user.status_code == 403 and as_user.json()["code"] == "runner_token_required"
    assert runner_api.registry.get("/api/tasks/").status_code == 401
    assert runner_api.pool.post("/api/repositories/", json={"name": "x", "url": "/tmp"}).status_code == 401
    assert expect(registry.get(f"/api/tasks/{task['id']}/"), 200)["status"] == "queued"
