"""The HTTP ports against the project's own server under gunicorn: claim (and its long poll),
events in order, usage, heartbeat with a cancel request, artifacts streamed and linked, finish,
and fencing: a runner whose attempt was reaped changes nothing."""

from __future__ import annotations

import json
import threading
import time
from decimal import Decimal

import pytest

from agentrunner.runner.http import ApiConfig, TokenRejected, ports_from_settings
from common.outcomes import LeaseLost
from registry import services as registry
from registry.models import Attempt
from tests.runner.conftest import use_server

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def remote(api_server, runner_token, settings):
    use_server(settings, api_server.base_url, runner_token)
    return ports_from_settings()


def test_a_whole_attempt_through_the_http_ports(remote, repository, tmp_path):
    task = registry.task_create(title="over http", instructions="fix", repository=repository)
    claimed = remote.registry.claim(runner_id="remote:1", task_id=None)
    assert claimed.id == task.pk and claimed.lease_token and claimed.repository_name == "sample"

    remote.registry.events(
        task=claimed, events=[{"type": "step", "message": f"event {i}", "data": {"i": i}} for i in range(3)]
    )
    remote.registry.add_usage(task=claimed, prompt_tokens=10, completion_tokens=5, cost_usd=Decimal("0.0000123456"))
    assert remote.registry.heartbeat(task=claimed).cancel_requested is False
    registry.task_cancel(task_id=task.pk)
    assert remote.registry.heartbeat(task=claimed).cancel_requested is True

    blob = tmp_path / "report.txt"
    blob.write_bytes(b"tests passed\n" * 100_000)
    artifact_id = remote.artifacts.store(
        task=claimed, path=blob, name="tests.log", kind="test_report", content_type="text/plain", metadata={}
    )
    remote.registry.link_artifact(task=claimed, artifact_id=artifact_id, role="test_report")
    remote.registry.flush()
    status = remote.registry.finish(
        task=claimed, status="cancelled", failure_reason="cancelled", message="cancelled by request", retry=False,
        result={}, metrics={"phases": {}},
    )  # fmt: skip
    assert status == "cancelled"
    task.refresh_from_db()
    assert (task.prompt_tokens, task.completion_tokens) == (10, 5)
    assert task.cost_usd == Decimal("0.000012")
    messages = [e.message for e in task.events.filter(type="step").order_by("seq")]
    assert messages == ["event 0", "event 1", "event 2"]
    link = task.artifact_links.get(role="test_report")
    assert link.artifact.size == blob.stat().st_size
    assert set(remote.timed.seconds) >= {"registry", "artifacts"}


def test_the_long_poll_claim_wakes_for_a_new_task(remote, repository):
    found = {}

    def claim():
        started = time.monotonic()
        found["task"] = remote.registry.claim(runner_id="remote:poll", task_id=None, wait=10)
        found["after"] = time.monotonic() - started

    thread = threading.Thread(target=claim)
    thread.start()
    time.sleep(1.0)
    task = registry.task_create(title="late", instructions="x", repository=repository)
    thread.join(timeout=20)
    assert found["task"] is not None and found["task"].id == task.pk
    assert 0.9 <= found["after"] < 9, found["after"]
    assert remote.registry.claim(runner_id="remote:poll", task_id=None, wait=0) is None


def test_a_reaped_attempt_is_fenced_and_its_late_result_discarded(remote, repository):
    task = registry.task_create(title="fenced", instructions="x", repository=repository, max_attempts=3)
    claimed = remote.registry.claim(runner_id="remote:1", task_id=task.pk)
    Attempt.objects.filter(pk=claimed.attempt_id).update(heartbeat_at="2000-01-01T00:00:00Z")
    assert registry.attempts_reap_lost(stale_after_seconds=60)
    with pytest.raises(LeaseLost):
        remote.registry.heartbeat(task=claimed)
    remote.registry.events(task=claimed, events=[{"type": "late", "message": "after the reaper"}])
    with pytest.raises(LeaseLost):
        remote.registry.finish(
            task=claimed, status="succeeded", failure_reason="", message="", retry=False, result={}, metrics={}
        )
    task.refresh_from_db()
    assert task.status == "queued" and not task.events.filter(type="late").exists()


def test_a_revoked_token_is_refused(remote, repository, runner_token):
    from runners.models import RunnerToken
    from runners.services import runner_token_revoke

    registry.task_create(title="t", instructions="x", repository=repository)
    runner_token_revoke(token_id=RunnerToken.objects.get().pk)
    with pytest.raises(TokenRejected):
        remote.registry.claim(runner_id="remote:1", task_id=None)


def test_api_config_from_settings(settings):
    settings.AGENTRUNNER_API_URL = "http://server:8000"
    settings.AGENTRUNNER_RUNNER_TOKEN = ""
    assert ApiConfig.from_settings() is None  # no token: not a remote runner
    settings.AGENTRUNNER_RUNNER_TOKEN = "art_r_x"
    settings.ARTIFACT_STORE_URL = "http://blobs:9000/"
    config = ApiConfig.from_settings()
    assert config.registry_url == config.pool_url == "http://server:8000/api/runner/v1/"
    assert config.artifacts_url == "http://blobs:9000/api/runner/v1/"
    settings.AGENTRUNNER_API_URL = ""
    assert ApiConfig.from_settings() is None  # the registry and the pool have no URL


def test_store_with_a_role_links_in_one_request(remote, repository, tmp_path):
    registry.task_create(title="one call", instructions="fix", repository=repository)
    claimed = remote.registry.claim(runner_id="remote:1", task_id=None)
    blob = tmp_path / "patch.diff"
    blob.write_bytes(b"--- a\n+++ b\n")
    api = remote.artifacts.api
    before = api.calls
    artifact_id = remote.artifacts.store(
        task=claimed, path=blob, name="x.patch", kind="patch", content_type="text/x-diff",
        metadata={"task": str(claimed.id), "attempt": claimed.attempt_number}, role="patch",
    )  # fmt: skip
    assert api.calls - before == 1  # the upload, nothing else
    link = Attempt.objects.get(pk=claimed.attempt_id).task.artifact_links.get(role="patch")
    assert link.artifact_id == artifact_id and link.attempt_number == 1
    assert remote.artifacts.parallel_uploads > 1  # the pipeline sends an attempt's uploads side by side


# --- event batches and the server's JSON body cap (AGENTRUNNER_MAX_JSON_BODY, 1 MiB) ---------------
def _claim(remote, repository):
    registry.task_create(title="events", instructions="x", repository=repository)
    return remote.registry.claim(runner_id="remote:events", task_id=None)


def _stored(claimed, type_: str = "step"):
    task = Attempt.objects.get(pk=claimed.attempt_id).task
    return list(task.events.filter(type=type_).order_by("seq"))


def test_events_larger_than_one_request_together_arrive_whole_and_in_order(remote, repository):
    """300 events of ~5 KB are 1.5 MB: more than one request may carry. Each batch stays under the cap."""
    claimed = _claim(remote, repository)
    events = [
        {"type": "step", "message": f"event {i} " + "m" * 900, "data": {"i": i, "out": ["o" * 900] * 4}}
        for i in range(300)
    ]
    before = remote.registry.api.calls
    remote.registry.events(task=claimed, events=events)
    remote.registry.flush()
    stored = _stored(claimed)
    assert [e.data["i"] for e in stored] == list(range(300))
    assert stored[7].message == events[7]["message"] and stored[7].data == events[7]["data"]
    assert remote.registry.api.calls - before >= 2


def test_one_event_larger_than_the_cap_is_cut_not_the_batch_dropped(remote, repository):
    claimed = _claim(remote, repository)
    huge = {"type": "step", "message": "huge", "data": {"i": 1, "a": ["x" * 1000] * 1000, "b": ["y" * 1000] * 1000}}
    events = [{"type": "step", "message": "before", "data": {"i": 0}}, huge, {"type": "step", "data": {"i": 2}}]
    remote.registry.events(task=claimed, events=events)
    remote.registry.flush()
    stored = _stored(claimed)
    assert [e.data["i"] for e in stored] == [0, 1, 2]
    assert stored[1].message == "huge" and "_truncated" in stored[1].data
    assert len(json.dumps(stored[1].data)) < 1024 * 1024


def test_a_413_splits_the_batch_and_sends_it_again(remote, repository):
    """A runner that thinks the cap is larger than the server's learns it from the 413."""
    claimed = _claim(remote, repository)
    remote.registry.outbox.max_batch_bytes = 64 * 1024 * 1024
    events = [{"type": "step", "message": f"{i}", "data": {"i": i, "out": ["o" * 900] * 5}} for i in range(400)]
    remote.registry.events(task=claimed, events=events)
    remote.registry.flush()
    assert [e.data["i"] for e in _stored(claimed)] == list(range(400))
    assert remote.registry.outbox.max_batch_bytes <= 1024 * 1024


def test_one_refused_event_costs_only_itself(remote, repository):
    """The server refuses an event the registry writes itself ('status'): its neighbours still arrive."""
    claimed = _claim(remote, repository)
    events = [{"type": "step", "data": {"i": i}} for i in range(6)]
    events[3] = {"type": "status", "message": "forged", "data": {"i": 3}}
    remote.registry.events(task=claimed, events=events)
    remote.registry.flush()
    assert [e.data["i"] for e in _stored(claimed)] == [0, 1, 2, 4, 5]
    task = Attempt.objects.get(pk=claimed.attempt_id).task
    assert not task.events.filter(type="status", message="forged").exists()


def test_nan_and_lone_surrogates_do_not_stop_the_outbox(remote, repository):
    claimed = _claim(remote, repository)
    events = [
        {"type": "step", "message": "bad \ud800 text", "data": {"i": 0, "x": float("nan"), "k\x00": "\udfff"}},
        {"type": "step", "data": {"i": 1}},
    ]
    remote.registry.events(task=claimed, events=events)
    remote.registry.flush()
    stored = _stored(claimed)
    assert [e.data["i"] for e in stored] == [0, 1]
    assert stored[0].message == "bad \ufffd text" and stored[0].data["x"] is None


def test_a_token_revoked_mid_run_is_what_the_summary_says(remote, llm, sample_repo):
    """The run stopped at its next heartbeat and said "lease lost": the cause was the revocation."""
    from django.db import connection

    from agentrunner.runner.pipeline import run_task
    from runners.models import RunnerToken
    from runners.services import runner_token_revoke
    from tests.llm_server import Reply, tool

    def respond(request):
        if len(llm.requests) == 1:
            try:
                runner_token_revoke(token_id=RunnerToken.objects.get().pk)
            finally:
                connection.close()
        return Reply(body=tool("list_files"), delay=1.5)

    llm.responder = respond
    task = registry.task_create(title="revoked", instructions="make add() add", repository=sample_repo)
    summary = run_task(task_id=task.pk)
    assert summary.status == "lost", summary
    assert "revoked" in summary.message and "lease was lost" not in summary.message, summary.message
    assert "runner token" in summary.message


def test_an_in_process_runner_and_a_remote_one_sharing_a_data_folder_keep_apart(remote, repository, settings):
    """Both put slot 0 of the repository at pool/sample/0: the remote runner reset and re-used the
    in-process runner's working copy under its feet."""
    import socket
    from pathlib import Path

    from repopool import services as pool
    from repopool.models import Slot

    settings.AGENTRUNNER_HOST = socket.gethostname()  # in-process: the server's own pool, as on the server
    local = pool.slot_allocate(repository=repository, holder="server", lease_seconds=60)
    claimed = _claim(remote, repository)
    lease = remote.pool.allocate(task=claimed, holder="remote", lease_seconds=60, wait_seconds=0, ref="")
    try:
        mine, theirs = Path(local.path).resolve(), Path(lease.path).resolve()
        assert mine != theirs and not mine.is_relative_to(theirs) and not theirs.is_relative_to(mine)
        assert "test-host" in theirs.parts[-3] and (theirs / ".git").is_dir() and (mine / ".git").is_dir()
        # The server's row says where the host keeps it (relative to that host's pool root).
        row = Slot.objects.get(pk=lease.slot_id)
        assert row.host == "test-host" and Path(row.path).parts[0] == theirs.parts[-3]
    finally:
        remote.pool.release(slot_id=lease.slot_id, token=lease.token)
        pool.slot_release(slot_id=local.slot_id, lease_token=local.lease_token)


def test_a_copy_missing_from_the_runners_disk_is_cloned_again(remote, repository):
    """A wiped data folder, or copies kept under the layout before the host's folder: the slot's
    row says it was prepared, the disk has nothing; the host clones it again instead of breaking it."""
    import shutil

    from repopool.models import Slot

    claimed = _claim(remote, repository)
    first = remote.pool.allocate(task=claimed, holder="remote", lease_seconds=60, wait_seconds=0, ref="")
    remote.pool.release(slot_id=first.slot_id, token=first.token)
    shutil.rmtree(first.path)
    again = remote.pool.allocate(task=claimed, holder="remote", lease_seconds=60, wait_seconds=0, ref="")
    try:
        assert again.slot_id == first.slot_id and (again.path / "calc.py").exists()
        assert again.commit == first.commit and Slot.objects.get(pk=again.slot_id).state == "leased"
    finally:
        remote.pool.release(slot_id=again.slot_id, token=again.token)
