"""The runner as separate processes: killed with SIGKILL and recovered, a real Celery worker."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from django.core.management import call_command

from agentrunner.runner.pipeline import run_task
from registry import services as registry
from registry.models import Attempt, Task
from repopool.models import Slot
from tests.conftest import require_service, run_git
from tests.llm_server import Reply, tool
from tests.runner.conftest import fixer
from tests.runner.helpers import child_env, manage, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_runner_killed_with_sigkill_is_recovered_by_reaping(llm, sample_repo, settings):
    llm.responder = lambda request: (
        Reply(body=tool("write_file", path="half.txt", content="x"), delay=0.2)
        if len(request["messages"]) < 4
        else Reply(body=tool("list_files"), delay=60)
    )
    task = registry.task_create(title="doomed", instructions="fix add", repository=sample_repo, max_attempts=2)
    child = subprocess.Popen(
        manage("runagent", str(task.pk), "--quiet"),
        env=child_env(llm, AGENTRUNNER_LEASE_SECONDS="3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: Slot.objects.filter(state="leased").exists() and len(llm.requests) >= 2,
            message="the runner to lease a slot and call the model",
        )
        slot = Slot.objects.get(state="leased")
        assert (Path(slot.path) / "half.txt").exists()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert Task.objects.get(pk=task.pk).status == "running"  # nobody told the registry

    settings.AGENTRUNNER_ATTEMPT_STALE_SECONDS = 2
    reaped = {"slots": 0, "attempts": 0}

    def reap_until_done():
        from io import StringIO

        out = StringIO()
        call_command("reap_leases", stdout=out)
        import re

        slots, attempts = map(int, re.match(r"reaped (\d+) slot\(s\), (\d+) lost attempt", out.getvalue()).groups())
        reaped["slots"] += slots
        reaped["attempts"] += attempts
        return reaped["slots"] >= 1 and reaped["attempts"] >= 1

    wait_for(reap_until_done, timeout=20, message="reaping of the expired lease and the lost attempt")
    slot.refresh_from_db()
    assert slot.state == "free" and not (Path(slot.path) / "half.txt").exists()
    assert run_git(Path(slot.path), "status", "--porcelain") == ""
    attempt = Attempt.objects.get(task=task, number=1)
    assert attempt.outcome == "lost"
    task.refresh_from_db()
    assert task.status == "queued"

    # The killed runner's run folder is still on this host, with what attempt 1 had written.
    left_behind = settings.TMP_ROOT / f"run-{task.pk.hex}-1"
    assert (left_behind / "transcript.jsonl").exists() and (left_behind / "run.log").exists()

    llm.responder = fixer
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded" and summary.attempt == 2

    # Attempt 2 kept attempt 1's transcript and log as that attempt's artifacts, then removed the folder.
    from artifacts.services import artifact_open
    from registry.models import TaskEvent

    recovered = {
        link.role: link.artifact for link in task.artifact_links.select_related("artifact").filter(attempt_number=1)
    }
    assert set(recovered) == {"transcript", "log"}
    assert all(artifact.metadata["recovered"] is True for artifact in recovered.values())
    with artifact_open(artifact=recovered["transcript"]) as handle:
        assert b"half.txt" in handle.read()  # the model's call of the killed attempt
    with artifact_open(artifact=recovered["log"]) as handle:
        assert b"attempt 1" in handle.read()
    assert TaskEvent.objects.filter(task=task, type="run_recovered", data__attempt=1).exists()
    assert not left_behind.exists()


def test_runagent_command_paths_and_exit_codes(llm, sample_repo, make_repo, capsys):
    llm.responder = fixer
    repo_path = make_repo(name="quick")
    env = child_env(llm)
    from tests.runner.conftest import TEST_COMMAND

    done = subprocess.run(
        manage("runagent", "--repo", str(repo_path), "--instructions", "make add() add", "--test-command", TEST_COMMAND, "--json"),
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    import json

    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (
        summary["status"] == "succeeded" and summary["tests_passed"] is True and summary["files_changed"] == ["calc.py"]
    )
    assert "git fetch" in summary["fetch"]
    assert "task" in done.stderr and "agent" in done.stderr  # live progress went to stderr

    human = subprocess.run(manage("runagent", summary["task_id"]), env=env, capture_output=True, text=True, timeout=60)
    assert human.returncode == 1 and "cannot claim a succeeded task" in human.stderr

    failing = registry.task_create(title="bad ref", instructions="x", repository=sample_repo, base_ref="nope")
    result = subprocess.run(manage("runagent", "--next"), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "failed (git_error)" in result.stdout and str(failing.pk) in result.stdout

    idle = subprocess.run(manage("runagent", "--next"), env=env, capture_output=True, text=True, timeout=60)
    assert idle.returncode == 3 and "nothing to run" in idle.stderr
    usage = subprocess.run(manage("runagent"), env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 1 and "give exactly one of" in usage.stderr
    unknown = subprocess.run(manage("runagent", str(uuid.uuid4())), env=env, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr and "Traceback" not in unknown.stderr
    bad_cost = subprocess.run(
        manage("runagent", "--repo", ".", "--instructions", "x", "--max-cost", "lots"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_cost.returncode != 0 and "not a number" in bad_cost.stderr


def test_loop_with_concurrency_runs_everything(llm, sample_repo):
    llm.responder = fixer
    tasks = [registry.task_create(title=f"T{i}", instructions="fix add", repository=sample_repo) for i in range(4)]
    from io import StringIO

    out = StringIO()
    call_command("runagent", "--loop", "--until-idle", "--concurrency", "2", "--quiet", stdout=out)
    assert out.getvalue().count("status    succeeded") == 4
    assert all(Task.objects.get(pk=t.pk).status == "succeeded" for t in tasks)


def test_demo_replays_the_shipped_transcript(db, capsys):
    from io import StringIO

    out = StringIO()
    call_command("demo", "--quiet", stdout=out, stderr=StringIO())
    text = out.getvalue()
    assert "status    succeeded" in text and "files     calc.py" in text and "tests     passed" in text
    task = Task.objects.get(title="Fix calc.add")
    assert {link.role for link in task.artifact_links.all()} == {"patch", "test_report", "transcript", "log"}
    assert task.cost_usd is not None and task.prompt_tokens > 0


def _broker_reachable(url: str) -> bool:
    if not url:
        return False
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False


def test_celery_worker_runs_a_task_through_redis(llm, sample_repo, settings, api, staff_api):
    broker = os.environ.get("CELERY_BROKER_URL", "")
    require_service(
        "Redis broker", broker.startswith("redis") and _broker_reachable(broker), "set CELERY_BROKER_URL=redis://..."
    )
    llm.responder = fixer
    queue = f"test-{uuid.uuid4().hex[:8]}"
    settings.AGENTRUNNER_AUTO_ENQUEUE = True
    settings.CELERY_TASK_DEFAULT_QUEUE = queue
    from agentrunner.celery import app

    app.conf.task_default_queue = queue
    worker = subprocess.Popen(
        [__import__("sys").executable, "-m", "celery", "-A", "agentrunner", "worker", "-P", "solo", "-Q", queue,
         "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "warning"],
        env=child_env(llm, CELERY_BROKER_URL=broker, CELERY_QUEUE=queue),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        created = api.post("/api/tasks/", {"repository": "sample", "instructions": "make add() add"}, format="json")
        assert created.status_code == 201
        task_id = created.json()["id"]
        wait_for(
            lambda: Task.objects.get(pk=task_id).status in ("succeeded", "failed"),
            timeout=90,
            message="the worker to run the task",
        )
        task = Task.objects.get(pk=task_id)
        assert task.status == "succeeded", task.failure_message
        # A worker claims with its own runner id (host:pid of the worker process).
        assert task.attempts.get().runner_id.endswith(f":{worker.pid}")

        # A warm request answers at once; the worker clones and sets up the pool.
        warm = staff_api.post(f"/api/repositories/{sample_repo.pk}/warm/")
        assert warm.status_code == 202
        wait_for(
            lambda: Slot.objects.filter(repository=sample_repo, state="free").count() == sample_repo.pool_size,
            timeout=60,
            message="the worker to warm the pool",
        )

        # runagent --enqueue hands an existing task to the worker.
        settings.AGENTRUNNER_AUTO_ENQUEUE = False
        second = registry.task_create(title="enqueued", instructions="make add() add", repository=sample_repo)
        enqueued = subprocess.run(
            manage("runagent", "--enqueue", str(second.pk)),
            env=child_env(llm, CELERY_BROKER_URL=broker, CELERY_QUEUE=queue), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert enqueued.returncode == 0 and f"enqueued {second.pk}" in enqueued.stdout
        wait_for(lambda: Task.objects.get(pk=second.pk).status == "succeeded", timeout=90, message="the enqueued task")
    finally:
        app.conf.task_default_queue = "agentrunner"
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def test_beat_schedule_names_registered_tasks(db):
    from agentrunner.celery import app

    app.loader.import_default_modules()
    for entry in app.conf.beat_schedule.values():
        assert entry["task"] in app.tasks, entry
    from agentrunner.tasks import reap, requeue_stale

    assert reap() == {"slots": [], "attempts": []}
    assert requeue_stale() == 0


def test_sigterm_winds_down_releases_the_slot_and_requeues(llm, sample_repo):
    llm.responder = lambda request: Reply(body=tool("list_files"), delay=0.3)
    task = registry.task_create(title="stopped", instructions="fix add", repository=sample_repo, max_attempts=3)
    child = subprocess.Popen(
        manage("runagent", str(task.pk), "--quiet"),
        env=child_env(llm),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(llm.requests) >= 2, message="the runner to call the model")
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 130, err
    assert "slot was released" in err
    task.refresh_from_db()
    assert task.status == "queued" and task.failure_reason == "infrastructure_error"
    assert Attempt.objects.get(task=task).outcome == "retry"
    slot = Slot.objects.get(repository=sample_repo, state="free", lease_count=1)
    assert run_git(Path(slot.path), "status", "--porcelain") == ""
