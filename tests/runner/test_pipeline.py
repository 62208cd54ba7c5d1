from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from agentrunner.runner.pipeline import run_task
from registry import services as registry
from registry.models import Attempt, Task
from repopool.models import Slot
from tests.conftest import processes_running, run_git
from tests.llm_server import Reply, error, tool
from tests.runner.conftest import API_KEY, fixer

# Every test runs twice: the pipeline's ports in-process, then over HTTP against the live server.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("mode")]


def new_task(repo, **kw):
    kw.setdefault("title", "Fix add")
    kw.setdefault("instructions", "add() subtracts; make it add.")
    return registry.task_create(repository=repo, **kw)


def artifact_bytes(task, kind) -> bytes:
    from artifacts.services import artifact_open

    link = task.artifact_links.select_related("artifact").get(role=kind)
    with artifact_open(artifact=link.artifact) as fh:
        return fh.read()


def slot_dir(slot) -> Path:
    """Where the slot's copy is: a remote host's slot path is relative to that host's pool root
    (here this process's, the runner's)."""
    from django.conf import settings

    return Path(settings.REPO_POOL_ROOT) / slot.path if not Path(slot.path).is_absolute() else Path(slot.path)


def assert_slots_free_and_clean(repo):
    slots = list(Slot.objects.filter(repository=repo))
    assert slots
    for slot in slots:
        assert slot.state == "free", (slot.state, slot.last_error)
        assert run_git(slot_dir(slot), "status", "--porcelain") == ""
        assert run_git(slot_dir(slot), "for-each-ref", "refs/heads") == ""


def test_complete_workflow_multi_file(llm, sample_repo, tmp_path, settings):
    llm.add(
        tool("read_file", path="calc.py"),
        tool(
            "edit_file",
            path="calc.py",
            old_text="    return a - b\n",
            new_text="    return a + b\n\n\ndef double(x):\n    return add(x, x)\n",
        ),
        tool(
            "write_file",
            path="test_double.py",
            content="from calc import double\n\n\ndef test_double():\n    assert double(4) == 8\n",
        ),
        tool("run_tests", args=[]),
        tool("finish", summary="Fixed add() and added double() with a test."),
    )
    task = new_task(sample_repo)
    summary = run_task(task_id=task.pk, runner_id="test-runner")
    task.refresh_from_db()
    assert summary.status == task.status == "succeeded", summary.message
    assert task.tests_passed is True and task.summary == "Fixed add() and added double() with a test."
    assert task.result_branch == f"agent/{task.id.hex[:8]}"
    assert sorted(summary.files_changed) == ["calc.py", "test_double.py"]
    assert (task.prompt_tokens, task.completion_tokens) == (500, 100)
    assert task.cost_usd == Decimal("0.0007") and not task.cost_unknown  # 500 x $1/M + 100 x $2/M

    # The branch outlives the slot: it is in the results repository.
    results = Path(settings.RESULTS_ROOT) / "sample.git"
    assert run_git(results, "rev-parse", task.result_branch) == task.result_commit
    assert task.result_fetch == f"git fetch {results} {task.result_branch}"
    message = run_git(results, "log", "-1", "--format=%an|%s|%b", task.result_branch)
    assert message.startswith("Agent Runner|Fix add|Fixed add()") and f"Agent-Runner-Task: {task.id}" in message

    # All four artifacts, linked; the patch applies with git am.
    assert {link.role for link in task.artifact_links.all()} == {"patch", "test_report", "transcript", "log"}
    patch = artifact_bytes(task, "patch")
    fresh = tmp_path / "fresh"
    run_git(tmp_path, "clone", "-q", sample_repo.url, str(fresh))
    (tmp_path / "change.patch").write_bytes(patch)
    run_git(fresh, "am", "-q", str(tmp_path / "change.patch"))
    assert "a + b" in (fresh / "calc.py").read_text() and (fresh / "test_double.py").exists()
    assert run_git(fresh, "log", "-1", "--format=%an", "HEAD") == "Agent Runner"
    assert b"2 passed" in artifact_bytes(task, "test_report")
    transcript = [json.loads(line) for line in artifact_bytes(task, "transcript").decode().splitlines()]
    assert [r["type"] for r in transcript].count("response") == 5
    log_text = artifact_bytes(task, "log").decode()
    assert "phase agent" in log_text and "phase commit" in log_text

    attempt = Attempt.objects.get(task=task)
    assert attempt.outcome == "succeeded" and attempt.runner_id == "test-runner"
    for phase in ("claim", "allocate", "prepare", "agent", "tests", "commit", "artifacts"):
        assert phase in attempt.metrics["phases"], attempt.metrics
    assert attempt.metrics["llm"]["calls"] == 5 and attempt.metrics["llm"]["duration"] > 0
    assert set(attempt.metrics["ports"]) >= {"registry", "pool", "artifacts"}
    types = [e.type for e in task.events.order_by("seq")]
    for expected in ("claimed", "slot_leased", "prepared", "llm_call", "tool_call", "tests", "committed"):
        assert expected in types
    assert types[-1] == "status"
    assert_slots_free_and_clean(sample_repo)


def test_failing_tests_go_back_to_the_agent_then_pass(llm, sample_repo):
    llm.add(
        tool("edit_file", path="calc.py", old_text="a - b", new_text="a * b"),
        tool("finish", summary="first try"),
        tool("edit_file", path="calc.py", old_text="a * b", new_text="a + b"),
        tool("finish", summary="second try"),
    )
    task = new_task(sample_repo)
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded" and summary.summary == "second try"
    feedback = llm.requests[2]["messages"][-1]
    assert feedback["role"] == "user" and "failed" in feedback["content"] and "assert" in feedback["content"]
    assert task.events.filter(type="iteration").count() == 1


def test_tests_still_failing_after_last_round(llm, sample_repo):
    llm.add(tool("edit_file", path="calc.py", old_text="a - b", new_text="a * b"), tool("finish", summary="wrong"))
    task = new_task(sample_repo, max_iterations=1)
    summary = run_task(task_id=task.pk)
    task.refresh_from_db()
    assert task.status == "failed" and task.failure_reason == "tests_failed" and task.tests_passed is False
    assert task.result_commit and summary.branch  # the attempt's work is kept for inspection
    assert {"patch", "test_report"} <= {link.role for link in task.artifact_links.all()}
    assert_slots_free_and_clean(sample_repo)


def test_no_changes_is_an_implementation_failure(llm, sample_repo):
    llm.add(tool("finish", summary="nothing to do"))
    task = new_task(sample_repo)
    run_task(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.failure_reason) == ("failed", "implementation_failed")
    assert "without changing anything" in task.failure_message
    assert task.attempts_count == 1  # permanent: no retry


def test_syntax_errors_the_agent_cannot_fix(llm, sample_repo):
    llm.responder = lambda request: (
        tool("write_file", path="calc.py", content="def add(a, b:\n")
        if len(request["messages"]) < 4
        else tool("finish", summary="done?")
    )
    task = new_task(sample_repo)
    run_task(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.failure_reason) == ("failed", "implementation_failed")
    assert "stuck" in task.failure_message
    assert_slots_free_and_clean(sample_repo)


def test_task_timeout(llm, sample_repo):
    llm.responder = lambda request: Reply(body=tool("list_files"), delay=0.4)
    task = new_task(sample_repo, timeout_seconds=1)
    started = time.monotonic()
    run_task(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.failure_reason) == ("failed", "timeout")
    assert time.monotonic() - started < 5
    assert_slots_free_and_clean(sample_repo)


def test_missing_base_ref_is_a_git_error(llm, sample_repo):
    task = new_task(sample_repo, base_ref="no-such-branch")
    run_task(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.failure_reason) == ("failed", "git_error") and task.attempts_count == 1
    assert "no-such-branch" in task.failure_message
    assert llm.requests == []
    assert_slots_free_and_clean(sample_repo)


def hold_slots(mode, repo, n):
    """Lease all ``n`` slots of the runner's pool (this host's in-process; the remote host's over
    HTTP); returns (slot id, token) of each."""
    if mode == "local":
        from repopool.services import slot_allocate

        return [
            (h.slot_id, h.lease_token)
            for h in (slot_allocate(repository=repo, holder=f"someone-{i}") for i in range(n))
        ]
    from agentrunner.runner.http import ApiConfig, shared_client

    config = ApiConfig.from_settings()
    held = []
    for i in range(n):
        reply = shared_client(config).call(
            "POST", config.pool_url + "slots/allocate/",
            json_body={"repository_id": repo.pk, "holder": f"someone-{i}", "lease_seconds": 600, "wait_seconds": 0},
        ).json()  # fmt: skip
        held.append((reply["slot"]["id"], reply["slot"]["token"]))
    return held


def test_no_slot_within_the_wait_is_transient(llm, sample_repo, mode):
    holds = hold_slots(mode, sample_repo, 2)
    task = new_task(sample_repo, max_attempts=2)
    run_task(task_id=task.pk)
    task.refresh_from_db()
    assert task.status == "queued" and task.failure_reason == "workspace_error" and task.attempts_count == 1
    assert Attempt.objects.get(task=task).outcome == "retry"
    run_task(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.failure_reason) == ("failed", "workspace_error")
    assert all(str(Slot.objects.get(pk=slot_id).lease_token) == str(token) for slot_id, token in holds)


def test_llm_auth_error_is_permanent(llm, sample_repo, settings):
    settings.OPENAI_API_KEY = "sk-wrong-000000000000"
    task = new_task(sample_repo)
    run_task(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.failure_reason, task.attempts_count) == ("failed", "llm_error", 1)
    assert "authentication" in task.failure_message and "sk-wrong" not in task.failure_message


def test_llm_unavailable_retries_then_succeeds(llm, sample_repo):
    llm.add(*[error(503, "overloaded")] * 3)  # the first attempt's call and its 2 retries
    llm.responder = fixer
    task = new_task(sample_repo)
    first = run_task(task_id=task.pk)
    assert first.status == "queued" and first.failure_reason == "llm_error"
    second = run_task(task_id=task.pk)
    task.refresh_from_db()
    assert second.status == task.status == "succeeded" and task.attempts_count == 2
    assert [a.outcome for a in task.attempts.order_by("number")] == ["retry", "succeeded"]
    assert task.events.filter(type="llm_retry").count() == 2


def test_budget_exceeded(llm, sample_repo):
    llm.responder = lambda request: tool("list_files")
    task = new_task(sample_repo, max_steps=3)
    run_task(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.failure_reason) == ("failed", "budget_exceeded") and len(llm.requests) == 3
    assert_slots_free_and_clean(sample_repo)


def _cancel_when(task, condition):
    def watch():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if condition():
                registry.task_cancel(task_id=task.pk)
                break
            time.sleep(0.05)
        from django.db import connection

        connection.close()

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def test_cancel_a_running_task_during_the_agent(llm, sample_repo):
    llm.responder = lambda request: Reply(body=tool("list_files"), delay=0.3)
    task = new_task(sample_repo)
    watcher = _cancel_when(task, lambda: len(llm.requests) >= 2)
    started = time.monotonic()
    summary = run_task(task_id=task.pk)
    watcher.join()
    assert summary.status == "cancelled" and time.monotonic() - started < 10
    task.refresh_from_db()
    assert task.failure_reason == "cancelled"
    assert_slots_free_and_clean(sample_repo)


def test_cancel_during_a_long_test_run_kills_it(llm, sample_repo):
    # The command runs in its own pid namespace: its child is found on the host by its argv.
    llm.add(tool("edit_file", path="calc.py", old_text="a - b", new_text="a + b"), tool("finish", summary="done"))
    task = new_task(sample_repo, test_command="sleep 121 & wait")
    watcher = _cancel_when(task, lambda: bool(processes_running(["sleep", "121"])))
    started = time.monotonic()
    summary = run_task(task_id=task.pk)
    watcher.join()
    assert summary.status == "cancelled"
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 5
    while processes_running(["sleep", "121"]):
        if time.monotonic() > deadline:
            pytest.fail("the test command's child survived cancellation")
        time.sleep(0.05)
    assert_slots_free_and_clean(sample_repo)


def test_secrets_never_reach_the_test_environment_or_artifacts(llm, sample_repo, settings, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("DATABASE_URL", "postgres://user:dbpassword@db/x")
    monkeypatch.setenv("DJANGO_SECRET_KEY", "django-secret-value")
    llm.responder = fixer
    task = new_task(sample_repo, test_command=f"env; {sample_repo.test_command}")
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded"
    task.refresh_from_db()
    for kind in ("patch", "test_report", "transcript", "log"):
        content = artifact_bytes(task, kind).decode(errors="replace")
        for secret in (API_KEY, "dbpassword", "django-secret-value"):
            assert secret not in content, (kind, secret)
    report = artifact_bytes(task, "test_report").decode()
    assert "PATH=" in report  # the env really was printed
    for event in task.events.all():
        assert API_KEY not in json.dumps(event.data) + event.message


def test_artifact_store_failure_spools_then_a_retry_uploads(llm, sample_repo, settings, tmp_path, mode):
    llm.responder = fixer
    good_storage = settings.STORAGES
    if mode == "local":  # the store's disk fails
        broken_root = tmp_path / "not-a-folder"
        broken_root.write_text("a file where the artifact folder should be")
        settings.STORAGES = {
            **good_storage,
            "artifacts": {
                **good_storage["artifacts"],
                "OPTIONS": {"location": str(broken_root / "x"), "allow_overwrite": True},
            },
        }
    else:  # the artifact store cannot be reached (its own URL, where nothing answers)
        settings.ARTIFACT_STORE_URL = "http://127.0.0.1:9"
        settings.AGENTRUNNER_API_RETRY_SECONDS = 1.0
    task = new_task(sample_repo, max_attempts=2)
    first = run_task(task_id=task.pk)
    task.refresh_from_db()
    assert first.status == "queued" and task.failure_reason == "infrastructure_error"
    assert set(first.spooled) == {"patch", "test_report", "transcript", "log"}
    assert "spool" in task.failure_message
    assert task.events.filter(type="artifact_spooled").count() == 4
    spool = Path(settings.SPOOL_ROOT) / task.id.hex
    assert len(list(spool.iterdir())) == 4

    settings.STORAGES = good_storage
    settings.ARTIFACT_STORE_URL = ""
    second = run_task(task_id=task.pk)
    task.refresh_from_db()
    assert second.status == "succeeded"
    roles = sorted((link.role, link.attempt_number) for link in task.artifact_links.all())
    # The spooled ones keep the attempt they were made by, in both modes (over HTTP the runner names
    # it in X-Artifact-Metadata and the upload links it in the same call).
    attempts = (1, 2)
    assert roles == sorted([(k, n) for k in ("patch", "test_report", "transcript", "log") for n in attempts])
    assert not spool.exists()


def test_dependencies_wait_then_fail(llm, sample_repo):
    llm.responder = fixer
    a = new_task(sample_repo, title="A")
    b = new_task(sample_repo, title="B", depends_on=[a])
    assert run_task(runner_id="r").task_id == str(a.pk)  # B is not runnable yet
    b.refresh_from_db()
    assert b.status == "queued"
    c = new_task(sample_repo, title="C", base_ref="missing-ref")
    d = new_task(sample_repo, title="D", depends_on=[c])
    run_task(task_id=c.pk)
    d.refresh_from_db()
    assert (d.status, d.failure_reason) == ("failed", "dependency_failed")


def test_concurrent_tasks_use_different_slots_without_interfering(llm, sample_repo):
    llm.responder = lambda request: Reply(body=fixer(request), delay=0.2)
    tasks = [new_task(sample_repo, title=f"T{i}") for i in range(2)]
    results = {}

    def go(task):
        results[task.pk] = run_task(task_id=task.pk)
        from django.db import connection

        connection.close()

    threads = [threading.Thread(target=go, args=(t,)) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.status for r in results.values()} == {"succeeded"}
    slots = {Attempt.objects.get(task=t).metrics["slot"] for t in tasks}
    assert len(slots) == 2
    for task in tasks:
        task.refresh_from_db()
        assert run_git(Path(sample_repo.url), "rev-parse", "HEAD") != task.result_commit
    assert_slots_free_and_clean(sample_repo)


def test_stress_sequential_tasks_leak_nothing(llm, sample_repo, mode):
    # Fifty in-process; twenty over HTTP, where each task also makes some forty requests.
    count = 50 if mode == "local" else 20
    llm.responder = fixer
    for i in range(count):
        new_task(sample_repo, title=f"stress {i}")

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    def children():
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(os.getpid())], capture_output=True, text=True).stdout
        return len(out.split()) - 1  # minus ps itself

    run_task()  # warm up lazily created clients and connections
    fds, kids = open_fds(), children()
    statuses = []
    for _ in range(count - 1):
        statuses.append(run_task().status)
        assert Slot.objects.filter(state="leased").count() == 0
    assert statuses == ["succeeded"] * (count - 1)
    assert open_fds() <= fds + 3
    assert children() <= kids
    assert Task.objects.filter(status="succeeded").count() == count
    assert_slots_free_and_clean(sample_repo)


def test_push_url_receives_the_branch(llm, make_repo, tmp_path):
    from repopool.services import repository_create
    from tests.runner.conftest import TEST_COMMAND

    remote = tmp_path / "team-remote.git"
    run_git(tmp_path, "init", "-q", "--bare", str(remote))
    repo = repository_create(name="pushy", url=str(make_repo()), test_command=TEST_COMMAND, push_url=str(remote))
    llm.responder = fixer
    task = new_task(repo)
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded"
    assert run_git(remote, "rev-parse", summary.branch) == summary.commit
    assert summary.fetch == f"git fetch {remote} {summary.branch}"
    # A user's repository gets the branch and nothing of ours.
    assert run_git(remote, "for-each-ref", "--format=%(refname)") == f"refs/heads/{summary.branch}"


def _objects_bytes(bare: Path) -> int:
    return sum(f.stat().st_size for f in (bare / "objects").rglob("*") if f.is_file())


def test_each_push_to_the_results_repository_sends_only_new_commits(llm, make_repo, settings):
    from repopool.services import repository_create
    from tests.conftest import SAMPLE_PROJECT
    from tests.runner.conftest import TEST_COMMAND

    # A history of some size: were it sent again with every task, the results repository would grow
    # by about its size each time.
    files = {**SAMPLE_PROJECT, **{f"pkg/module_{i}.py": f"VALUE = {i}\n" + "# filler\n" * 200 for i in range(300)}}
    repo = repository_create(name="sizable", url=str(make_repo(files)), pool_size=1, test_command=TEST_COMMAND)
    results = Path(settings.RESULTS_ROOT) / "sizable.git"
    sizes = []
    for _ in range(3):
        llm.responder = fixer
        assert run_task(task_id=new_task(repo).pk).status == "succeeded"
        sizes.append(_objects_bytes(results))
    first, later = sizes[0], [b - a for a, b in zip(sizes, sizes[1:], strict=False)]
    assert max(later) < first / 10, (sizes, later)
    assert run_git(results, "rev-parse", "refs/agentrunner/base") == Slot.objects.get(repository=repo).base_commit


def test_a_push_to_the_results_repository_does_not_see_earlier_results(llm, sample_repo, settings):
    """Every task leaves a branch there; a push must not list them all (receive-pack advertised
    every ref and walked from all of them, so each push got slower with every task before it)."""
    summaries = []
    for _ in range(2):
        llm.responder = fixer
        summaries.append(run_task(task_id=new_task(sample_repo).pk))
        assert summaries[-1].status == "succeeded", summaries[-1].message
    results = Path(settings.RESULTS_ROOT) / "sample.git"
    for summary in summaries:  # the branches are there, for fetching, as before
        assert run_git(results, "rev-parse", summary.branch) == summary.commit
    assert run_git(results, "for-each-ref", "refs/agentrunner/incoming/") == ""  # no staging ref left
    shown = subprocess.run(
        ["git", "receive-pack", "--advertise-refs", str(results)], capture_output=True, check=True
    ).stdout.decode()
    assert "refs/agentrunner/base" in shown and "refs/heads/agent/" not in shown, shown


def test_push_failure_is_a_git_error_and_the_slot_is_released(llm, make_repo, tmp_path):
    from repopool.services import repository_create
    from tests.runner.conftest import TEST_COMMAND

    repo = repository_create(
        name="nopush", url=str(make_repo()), test_command=TEST_COMMAND, push_url=str(tmp_path / "missing.git")
    )
    llm.responder = fixer
    task = new_task(repo)
    run_task(task_id=task.pk)
    task.refresh_from_db()
    assert (task.status, task.failure_reason) == ("failed", "git_error") and "push" in task.failure_message
    # The patch is made while the push runs, and kept only for a result that left the host.
    assert {link.role for link in task.artifact_links.all()} == {"test_report", "transcript", "log"}
    assert_slots_free_and_clean(repo)


def test_an_exception_in_the_runner_itself_still_releases_the_slot(llm, sample_repo):
    llm.responder = fixer

    def progress(info):
        if info.get("phase") == "commit":
            raise RuntimeError("progress display crashed")

    task = new_task(sample_repo, max_attempts=1)
    summary = run_task(task_id=task.pk, progress=progress)
    task.refresh_from_db()
    assert summary.status == task.status == "failed"
    assert task.failure_reason == "infrastructure_error" and "progress display crashed" in task.failure_message
    assert "RuntimeError" in artifact_bytes(task, "log").decode()
    assert_slots_free_and_clean(sample_repo)


def test_a_runner_whose_attempt_was_reaped_stops_and_records_nothing(llm, sample_repo, settings):
    settings.AGENTRUNNER_ATTEMPT_STALE_SECONDS = 3  # heartbeat every second
    llm.responder = lambda request: Reply(body=tool("list_files"), delay=0.3)
    task = new_task(sample_repo, max_attempts=3)

    def reap_when_running():
        if len(llm.requests) < 2:
            return False
        Attempt.objects.filter(task=task).update(heartbeat_at="2000-01-01T00:00:00Z")
        return bool(registry.attempts_reap_lost(stale_after_seconds=60))

    done = threading.Event()

    def reaper():
        from django.db import connection

        try:
            while not done.is_set() and not reap_when_running():
                time.sleep(0.05)
        finally:
            connection.close()

    thread = threading.Thread(target=reaper)
    thread.start()
    started = time.monotonic()
    summary = run_task(task_id=task.pk)
    done.set()
    thread.join()
    assert summary.status == "lost" and time.monotonic() - started < 10
    task.refresh_from_db()
    assert task.status == "queued"  # as the reaper left it: the zombie's result was discarded
    assert Attempt.objects.get(task=task, number=1).outcome == "lost"
    assert_slots_free_and_clean(sample_repo)


def test_a_base_ref_locked_by_another_runner_does_not_fail_the_push(llm, sample_repo, settings):
    # Another runner pushing at the same moment holds the lock of refs/agentrunner/base.
    llm.responder = fixer
    first = run_task(task_id=new_task(sample_repo).pk)
    assert first.status == "succeeded"
    results = Path(settings.RESULTS_ROOT) / "sample.git"
    # The ref names another commit (as after a push from an older base), so this push must update it.
    run_git(results, "update-ref", "refs/agentrunner/base", first.commit)
    lock = results / "refs" / "agentrunner" / "base.lock"
    lock.write_text("held by another push\n")
    llm.responder = fixer
    task = new_task(sample_repo)
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded", summary.message
    assert run_git(results, "rev-parse", summary.branch) == summary.commit
