"""The runner API attacked: a runner token held by someone hostile, a model whose output the
runner uploads, a runner whose attempt was reaped. Each test is one hole found in review: what
was a 500 or an overreach answers a clear 4xx and changes nothing."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from registry import services as registry
from registry.models import Attempt, Task, TaskEvent
from repopool import bookkeeping as pool_bookkeeping
from repopool.models import Slot
from runners import services as runners
from tests.runners.conftest import RunnerClient

pytestmark = pytest.mark.django_db


def _err(response) -> dict:
    body = response.json()
    assert {"detail", "code"} <= set(body), body
    return body


# --- malformed headers ------------------------------------------------------------------------
@pytest.mark.parametrize("lease", ["\u00e9t\u00e9", "x\u00ff" * 40])
def test_non_ascii_lease_token_is_lease_lost_not_500(runner, claimed, lease):
    """hmac.compare_digest raises TypeError on non-ASCII str: a header decoded as latin-1 made
    every attempt call answer 500."""
    beat = runner.post(f"attempts/{claimed.attempt_id}/heartbeat/", {}, key=None, lease=lease)
    assert beat.status_code == 409 and _err(beat)["code"] == "lease_lost"
    events = runner.post(f"attempts/{claimed.attempt_id}/events/", {"events": [{"type": "step"}]}, lease=lease)
    assert events.status_code == 409
    assert Attempt.objects.get(pk=claimed.attempt_id).outcome == "running"


# --- hostile JSON content (what the model wrote, relayed by the runner) --------------------------
NUL = "a\u0000b"


@pytest.mark.parametrize(
    "path,body,key",
    [
        ("events/", {"events": [{"type": "tool_call", "message": "m", "data": {"output": NUL}}]}, ""),
        ("events/", {"events": [{"type": "tool_call", "data": {NUL: 1}}]}, ""),
        ("events/", {"events": [{"type": "tool_call", "data": {"list": [{"deep": NUL}]}}]}, ""),
        ("heartbeat/", {"metrics": {"phase": NUL}}, None),
        ("finish/", {"status": "succeeded", "metrics": {"x": NUL}}, ""),
        ("finish/", {"status": "succeeded", "result": {"test_results": {"failed": [NUL]}}}, ""),
    ],
)
def test_nul_characters_in_json_data_are_400_not_500(runner, claimed, path, body, key):
    """PostgreSQL's jsonb cannot hold \\u0000: a model's output with a NUL byte in an event's
    data (or the metrics) was a DataError, a 500, and the events batch was lost."""
    before = TaskEvent.objects.filter(task_id=claimed.task_id).count()
    response = runner.post(f"attempts/{claimed.attempt_id}/{path}", body, key=key, lease=claimed.lease)
    assert response.status_code == 400, response.content
    assert _err(response)["code"] == "invalid"
    assert TaskEvent.objects.filter(task_id=claimed.task_id).count() == before
    assert Task.objects.get(pk=claimed.task_id).status == "running"


def test_nul_in_host_capacity_is_400_not_500(runner):
    response = runner.post("hosts/", {"name": "box-1", "capacity": {NUL: 1}})
    assert response.status_code == 400, response.content
    assert "capacity" in _err(response)["errors"]


# --- heartbeat's slot_id: another host's slot, a missing one, an absurd one ----------------------
@pytest.mark.parametrize("slot_id", [987654, 10**20])
def test_heartbeat_unknown_slot_is_4xx_not_500(runner, claimed, slot_id):
    """A slot id that does not exist was an IntegrityError (or bigint overflow): a 500."""
    beat = runner.post(f"attempts/{claimed.attempt_id}/heartbeat/", {"slot_id": slot_id}, key=None, lease=claimed.lease)
    assert beat.status_code in (400, 404), beat.content
    _err(beat)
    assert Attempt.objects.get(pk=claimed.attempt_id).slot_id is None


def test_heartbeat_cannot_record_another_hosts_slot(runner, claimed, repo):
    """A runner token reaches only the slots of its own hosts: a heartbeat naming another host's
    slot must not put that slot on this runner's attempt."""
    _, other_raw = runners.runner_token_create(name="host-b")
    other = RunnerClient(other_raw)
    assert other.post("hosts/", {"name": "box-b", "capacity": {"sample": 1}}).status_code == 200
    grant = other.post("slots/allocate/", {"repository_id": repo.pk, "holder": "box-b:1"})
    assert grant.status_code == 200, grant.content
    foreign = grant.json()["slot"]["id"]
    assert Slot.objects.get(pk=foreign).host == "box-b"

    beat = runner.post(f"attempts/{claimed.attempt_id}/heartbeat/", {"slot_id": foreign}, key=None, lease=claimed.lease)
    assert beat.status_code == 404, beat.content
    assert _err(beat)["code"] == "slot_not_found"
    assert Attempt.objects.get(pk=claimed.attempt_id).slot_id is None


def test_heartbeat_with_own_slot_still_records_it(runner, claimed, repo):
    assert runner.post("hosts/", {"name": "box-1", "capacity": {"sample": 1}}).status_code == 200
    slot_id = runner.post("slots/allocate/", {"repository_id": repo.pk, "holder": "box-1:1"}).json()["slot"]["id"]
    beat = runner.post(f"attempts/{claimed.attempt_id}/heartbeat/", {"slot_id": slot_id}, key=None, lease=claimed.lease)
    assert beat.status_code == 200, beat.content
    assert Attempt.objects.get(pk=claimed.attempt_id).slot_id == slot_id


# --- a token revoked while its long poll waits -------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_token_revoked_during_long_poll_claims_nothing(runner_token, repo):
    """Authentication ran once, before a claim's wait of up to 30 s: a task that became runnable
    after the token was revoked was still handed to it (and then stuck until reaped)."""
    token, raw = runner_token
    replies = []

    def poll():
        try:
            replies.append(RunnerClient(raw).post("claim/", {"runner_id": "box-1:1", "wait": 4}))
        finally:
            connection.close()

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.8)
    runners.runner_token_revoke(token_id=token.pk)
    task = registry.task_create(title="fix", instructions="fix add()", repository=repo)
    thread.join(timeout=30)
    assert replies and replies[0].status_code == 401, replies and replies[0].content
    assert replies[0].json()["code"] == "token_revoked"
    assert Task.objects.get(pk=task.pk).status == "queued"


@pytest.mark.django_db(transaction=True)
def test_token_revoked_during_slot_wait_leases_nothing(runner_token, repo):
    token, raw = runner_token
    host = RunnerClient(raw)
    assert host.post("hosts/", {"name": "box-1", "capacity": {"sample": 1}}).status_code == 200
    held = host.post("slots/allocate/", {"repository_id": repo.pk, "holder": "box-1:1"}).json()["slot"]
    replies = []

    def wait_for_slot():
        try:
            body = {"repository_id": repo.pk, "holder": "box-1:2", "wait_seconds": 4}
            replies.append(RunnerClient(raw).post("slots/allocate/", body))
        finally:
            connection.close()

    thread = threading.Thread(target=wait_for_slot)
    thread.start()
    time.sleep(0.8)
    runners.runner_token_revoke(token_id=token.pk)
    pool_bookkeeping.slot_release_remote(slot_id=held["id"], token=held["token"], commit="")
    thread.join(timeout=30)
    assert replies and replies[0].status_code == 401, replies and replies[0].content
    assert Slot.objects.get(pk=held["id"]).state == "free"
