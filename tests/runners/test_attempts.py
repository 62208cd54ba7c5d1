"""The attempt-scoped calls: the whole sequence, replays that change nothing, key reuse, fencing."""

from __future__ import annotations

import hashlib
from decimal import Decimal

import pytest

from artifacts.models import Artifact
from registry import services as registry
from registry.models import Attempt, Task, TaskArtifact, TaskEvent
from runners import services as runners
from runners.models import IdempotencyRecord
from tests.runners.conftest import claim

pytestmark = pytest.mark.django_db


def _events(n: int, start: int = 0) -> dict:
    return {"events": [{"type": "step", "message": f"step {i}", "data": {"i": i}} for i in range(start, start + n)]}


def test_claim_events_usage_upload_link_finish(runner, claimed):
    a, lease = claimed.attempt_id, claimed.lease
    assert claimed.body["task"]["title"] == "fix" and claimed.body["task"]["lease_token"] == lease
    assert claimed.body["task"]["attempt_id"] == a and claimed.body["attempt"]["number"] == 1
    assert Attempt.objects.get(pk=a).runner_id == "host-a:1"

    beat = runner.post(f"attempts/{a}/heartbeat/", {"metrics": {"step": 1}}, key=None, lease=lease)
    assert beat.status_code == 200 and beat.json() == {"cancel_requested": False, "attempt_status": "running"}
    assert Attempt.objects.get(pk=a).metrics == {"step": 1}

    before = TaskEvent.objects.filter(task_id=claimed.task_id).count()
    events = runner.post(f"attempts/{a}/events/", _events(3), lease=lease)
    assert events.status_code == 200, events.content
    assert events.json()["appended"] == 3
    seqs = list(TaskEvent.objects.filter(task_id=claimed.task_id, type="step").values_list("seq", "message"))
    assert [m for _, m in seqs] == ["step 0", "step 1", "step 2"]
    assert events.json()["last_seq"] == seqs[-1][0] == before + 3

    usage = runner.post(
        f"attempts/{a}/usage/", {"prompt_tokens": 100, "completion_tokens": 20, "cost_usd": "0.0012"}, lease=lease
    )
    assert usage.status_code == 200, usage.content
    content = b"log line\n" * 1000
    upload = runner.upload(a, content, lease=lease)
    assert upload.status_code == 201, upload.content
    body = upload.json()
    assert body["sha256"] == hashlib.sha256(content).hexdigest() and body["size"] == len(content)
    assert body["name"] == "run.log" and body["kind"] == "log"
    link = runner.post(f"attempts/{a}/artifact-links/", {"artifact_id": body["id"], "role": "log"}, lease=lease)
    assert link.status_code == 201, link.content
    assert TaskArtifact.objects.get(task_id=claimed.task_id).attempt_number == 1

    finish = runner.post(
        f"attempts/{a}/finish/",
        {
            "status": "succeeded",
            "message": "done",
            "result": {"result_branch": f"agent/{claimed.task_id.hex[:8]}", "tests_passed": True},
        },
        lease=lease,
    )
    assert finish.status_code == 200, finish.content
    assert finish.json() == {"status": "succeeded"}
    task = Task.objects.get(pk=claimed.task_id)
    assert (task.status, task.result_branch, task.tests_passed) == (
        "succeeded",
        f"agent/{claimed.task_id.hex[:8]}",
        True,
    )
    assert (task.prompt_tokens, task.completion_tokens, task.cost_usd) == (100, 20, Decimal("0.0012"))


def test_replays_change_nothing(runner, claimed):
    a, lease = claimed.attempt_id, claimed.lease
    task_id = claimed.task_id

    first = runner.post(f"attempts/{a}/events/", _events(2), key="ev-1", lease=lease)
    count = TaskEvent.objects.filter(task_id=task_id).count()
    again = runner.post(f"attempts/{a}/events/", _events(2), key="ev-1", lease=lease)
    assert again.status_code == 200 and again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"
    assert TaskEvent.objects.filter(task_id=task_id).count() == count

    usage = {"prompt_tokens": 10, "completion_tokens": 5, "cost_usd": "0.5"}
    for _ in range(3):
        assert runner.post(f"attempts/{a}/usage/", usage, key="use-1", lease=lease).status_code == 200
    task = Task.objects.get(pk=task_id)
    assert (task.prompt_tokens, task.completion_tokens, task.cost_usd) == (10, 5, Decimal("0.5"))

    content = b"patch bytes"
    up1 = runner.upload(a, content, lease=lease, key="up-1", kind="patch", name="x.patch")
    up2 = runner.upload(a, content, lease=lease, key="up-1", kind="patch", name="x.patch")
    assert up1.status_code == up2.status_code == 201 and up1.json() == up2.json()
    assert Artifact.objects.count() == 1

    link = {"artifact_id": up1.json()["id"], "role": "patch"}
    assert runner.post(f"attempts/{a}/artifact-links/", link, key="ln-1", lease=lease).status_code == 201
    assert runner.post(f"attempts/{a}/artifact-links/", link, key="ln-1", lease=lease).status_code == 201
    assert TaskArtifact.objects.filter(task_id=task_id).count() == 1

    finish = {"status": "failed", "failure_reason": "tests_failed", "message": "no", "retry": True}
    done = runner.post(f"attempts/{a}/finish/", finish, key="fin-1", lease=lease)
    assert done.status_code == 200, done.content
    status_events = TaskEvent.objects.filter(task_id=task_id, type="status").count()
    replay = runner.post(f"attempts/{a}/finish/", finish, key="fin-1", lease=lease)
    assert replay.status_code == 200 and replay.json() == done.json()
    assert TaskEvent.objects.filter(task_id=task_id, type="status").count() == status_events
    assert Task.objects.get(pk=task_id).attempts_count == 1  # requeued once, not twice
    # A new request (new key) after the finish is fenced out.
    late = runner.post(f"attempts/{a}/finish/", finish, lease=lease)
    assert late.status_code == 409 and late.json()["code"] == "lease_lost"


def test_key_reuse_with_another_body_is_422_and_changes_nothing(runner, claimed):
    a, lease = claimed.attempt_id, claimed.lease
    assert runner.post(f"attempts/{a}/events/", _events(1), key="k", lease=lease).status_code == 200
    count = TaskEvent.objects.filter(task_id=claimed.task_id).count()
    reused = runner.post(f"attempts/{a}/events/", _events(1, start=5), key="k", lease=lease)
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"
    assert TaskEvent.objects.filter(task_id=claimed.task_id).count() == count
    # The same key on another endpoint is another request too.
    usage = runner.post(f"attempts/{a}/usage/", {"prompt_tokens": 1, "completion_tokens": 1, "cost_usd": None},
                        key="k", lease=lease)  # fmt: skip
    assert usage.status_code == 422
    assert Task.objects.get(pk=claimed.task_id).prompt_tokens == 0


@pytest.mark.parametrize("key", [None, "", "has space", "x" * 129, "é"])
def test_missing_or_bad_key_is_400(runner, claimed, key):
    response = runner.post(f"attempts/{claimed.attempt_id}/events/", _events(1), key=key or None, lease=claimed.lease)
    if key == "":
        response = runner.client.post(
            f"/api/runner/v1/attempts/{claimed.attempt_id}/events/", _events(1), format="json",
            HTTP_IDEMPOTENCY_KEY="", HTTP_X_LEASE_TOKEN=claimed.lease,
        )  # fmt: skip
    assert response.status_code == 400, response.content
    assert "Idempotency-Key" in response.json()["errors"]


def _every_attempt_call(runner, a, lease, artifact_id=None):
    yield "heartbeat", runner.post(f"attempts/{a}/heartbeat/", {}, key=None, lease=lease)
    yield "events", runner.post(f"attempts/{a}/events/", _events(1), lease=lease)
    yield "usage", runner.post(f"attempts/{a}/usage/", {"prompt_tokens": 1, "completion_tokens": 1, "cost_usd": "1"},
                               lease=lease)  # fmt: skip
    yield "upload", runner.upload(a, b"late bytes", lease=lease)
    if artifact_id is not None:
        yield "link", runner.post(f"attempts/{a}/artifact-links/", {"artifact_id": artifact_id}, lease=lease)
    yield "finish", runner.post(f"attempts/{a}/finish/", {"status": "succeeded"}, lease=lease)


def _snapshot(task_id):
    return (
        Task.objects.filter(pk=task_id).values().get(),
        TaskEvent.objects.filter(task_id=task_id).count(),
        TaskArtifact.objects.filter(task_id=task_id).count(),
        Artifact.objects.count(),
        IdempotencyRecord.objects.count(),
    )


def _assert_all_fenced(runner, claimed, lease, artifact_id=None):
    before = _snapshot(claimed.task_id)
    for name, response in _every_attempt_call(runner, claimed.attempt_id, lease, artifact_id):
        assert response.status_code == 409, (name, response.content)
        assert response.json()["code"] == "lease_lost", name
    assert _snapshot(claimed.task_id) == before


def test_reaped_attempt_gets_409_and_changes_nothing(runner, claimed):
    uploaded = runner.upload(claimed.attempt_id, b"early", lease=claimed.lease).json()["id"]
    Attempt.objects.filter(pk=claimed.attempt_id).update(heartbeat_at="2000-01-01T00:00:00Z")
    assert len(registry.attempts_reap_lost(stale_after_seconds=60)) == 1
    assert Task.objects.get(pk=claimed.task_id).status == "queued"  # it will run again
    _assert_all_fenced(runner, claimed, claimed.lease, uploaded)


def test_finished_attempt_gets_409(runner, claimed):
    a = claimed.attempt_id
    assert (
        runner.post(f"attempts/{a}/finish/", {"status": "failed", "retry": True}, lease=claimed.lease).status_code
        == 200
    )
    again = claim(runner)  # the same task, attempt 2, another lease token
    assert again.task_id == claimed.task_id and again.lease != claimed.lease
    _assert_all_fenced(runner, claimed, claimed.lease)
    # The old lease token does not open the new attempt either.
    _assert_all_fenced(runner, again, claimed.lease)


def test_wrong_lease_token_409(runner, claimed):
    _assert_all_fenced(runner, claimed, "00000000-0000-0000-0000-000000000000")
    _assert_all_fenced(runner, claimed, "not-a-uuid")


def test_missing_lease_token_400(runner, claimed):
    response = runner.post(f"attempts/{claimed.attempt_id}/events/", _events(1))
    assert response.status_code == 400 and "X-Lease-Token" in response.json()["errors"]


def test_revoked_token_mid_sequence_401(runner, runner_token, claimed):
    a, lease = claimed.attempt_id, claimed.lease
    assert runner.post(f"attempts/{a}/events/", _events(1), lease=lease).status_code == 200
    runners.runner_token_revoke(token_id=runner_token[0].pk)
    count = TaskEvent.objects.filter(task_id=claimed.task_id).count()
    for name, response in _every_attempt_call(runner, a, lease):
        assert response.status_code == 401, name
        assert response.json()["code"] == "token_revoked", name
    assert TaskEvent.objects.filter(task_id=claimed.task_id).count() == count
    assert runner.post("claim/", {"runner_id": "x"}).status_code == 401


def test_link_only_artifacts_this_task_uploaded(runner, claimed, repo):
    from artifacts import services as artifacts

    foreign = artifacts.artifact_store(source=b"someone else's", name="x", kind="other")
    response = runner.post(
        f"attempts/{claimed.attempt_id}/artifact-links/", {"artifact_id": str(foreign.pk)}, lease=claimed.lease
    )
    assert response.status_code == 400 and "artifact_id" in response.json()["errors"]
    assert not TaskArtifact.objects.filter(task_id=claimed.task_id).exists()


def test_upload_checks(runner, claimed, settings):
    a, lease = claimed.attempt_id, claimed.lease
    bad = runner.upload(a, b"abc", lease=lease, sha256="0" * 64)
    assert bad.status_code == 400 and bad.json()["code"] == "checksum_mismatch"
    missing = runner.upload(a, b"abc", lease=lease, sha256="")
    assert missing.status_code == 400 and "X-Content-SHA256" in missing.json()["errors"]
    settings.ARTIFACTS_MAX_SIZE = 10
    big = runner.upload(a, b"x" * 11, lease=lease)
    assert big.status_code == 413
    kind = runner.upload(a, b"abc", lease=lease, kind="nonsense")
    assert kind.status_code == 400 and "kind" in kind.json()["errors"]
    assert Artifact.objects.count() == 0


def test_bad_bodies_are_400_with_field(runner, claimed):
    a, lease = claimed.attempt_id, claimed.lease
    cases = [
        ("events/", {"events": []}, "events"),
        ("events/", {"events": [{"type": "x"}] * 501}, "events"),
        ("events/", {"events": [{"type": ""}]}, "events"),
        ("events/", {"events": [{"type": "status", "data": {"to": "succeeded"}}]}, "events"),
        ("usage/", {"prompt_tokens": -1, "completion_tokens": 0, "cost_usd": None}, "prompt_tokens"),
        ("usage/", {"prompt_tokens": 1, "completion_tokens": 0, "cost_usd": "abc"}, "cost_usd"),
        ("finish/", {"status": "running"}, "status"),
        ("finish/", {"status": "failed", "failure_reason": "because"}, "failure_reason"),
        ("artifact-links/", {"artifact_id": "nope"}, "artifact_id"),
    ]
    for path, body, field in cases:
        response = runner.post(f"attempts/{a}/{path}", body, lease=lease)
        assert response.status_code == 400, (path, body, response.content)
        assert field in response.json()["errors"], (path, response.json())


def test_expired_key_is_free_again_and_purged(runner, claimed):
    from datetime import timedelta

    from django.utils import timezone

    from runners import idempotency

    a, lease = claimed.attempt_id, claimed.lease
    assert runner.post(f"attempts/{a}/events/", _events(1), key="old", lease=lease).status_code == 200
    IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(hours=25))
    count = TaskEvent.objects.filter(task_id=claimed.task_id).count()
    # Past 24 hours the key means a new request: it is carried out again.
    assert runner.post(f"attempts/{a}/events/", _events(1), key="old", lease=lease).status_code == 200
    assert TaskEvent.objects.filter(task_id=claimed.task_id).count() == count + 1
    IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(hours=25))
    records = IdempotencyRecord.objects.count()  # the claim's and the events'
    assert records == 2 and idempotency.purge_expired() == records and not IdempotencyRecord.objects.exists()


def test_replay_only_leaves_a_task_that_needs_a_model_queued(runner, repo):
    live = registry.task_create(title="live", instructions="fix", repository=repo)
    assert runner.post("claim/", {"runner_id": "host-a:1", "replay_only": True}).status_code == 204
    replayed = registry.task_create(
        title="replayed", instructions="fix", repository=repo, llm_config={"provider": "replay", "replay_file": "/t"}
    )
    got = claim(runner, replay_only=True)
    assert got.task_id == replayed.pk
    live.refresh_from_db()
    assert live.status == "queued" and live.attempts_count == 0
    bad = runner.post("claim/", {"runner_id": "host-a:1", "replay_only": "perhaps"})
    assert bad.status_code == 400 and "replay_only" in bad.json()["errors"], bad.content
