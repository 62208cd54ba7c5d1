"""The broker stopped for 15 s under a Celery worker running a task: the worker terminates the task,
which ends its attempt (failed, infrastructure_error, to be retried) and frees its slot at once,
not when a reaper runs; once the broker is back the task runs again, to success."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid

import pytest

from registry import services as registry
from registry.models import Attempt, Task
from repopool import services as pool
from repopool.models import Slot
from tests.faults.conftest import API_KEY
from tests.faults.services import base_env, manage_command, stop_process, wait_for
from tests.llm_server import Reply, tool
from tests.runner.conftest import TEST_COMMAND
from tests.runner.helpers import database_url

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

OUTAGE_SECONDS = 15


def slow_fixer(request):
    """Looks around slowly for a while (the broker goes away meanwhile), then fixes add()."""
    done = sum(1 for m in request["messages"] if m["role"] == "tool")
    if done < 8:
        return Reply(body=tool("list_files"), delay=0.5)
    return {8: tool("edit_file", path="calc.py", old_text="a - b", new_text="a + b"), 9: tool("run_tests")}.get(
        done, tool("finish", summary="add() now adds")
    )


def test_broker_outage_ends_the_running_attempt_and_the_task_runs_again(llm, own_redis, make_repo, tmp_path, settings):
    repository = pool.repository_create(
        name="sample", url=str(make_repo()), pool_size=1, test_command=TEST_COMMAND, keep_paths=[".venv"]
    )
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    env = base_env(
        settings.DATA_DIR, database_url(), CELERY_BROKER_URL=own_redis.url, CELERY_QUEUE=queue,
        OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=llm.base_url, AGENTRUNNER_LLM_MODEL="test-model",
        AGENTRUNNER_LLM_BACKOFF_BASE="0.01", AGENTRUNNER_SLOT_WAIT_SECONDS="1",
        # Beat re-enqueues tasks left queued (their message was lost with the broker); the reaper
        # stays out of it: what frees the slot here is the worker itself.
        AGENTRUNNER_REQUEUE_AFTER="3", AGENTRUNNER_REAP_INTERVAL="3600", AGENTRUNNER_LOG_LEVEL="INFO",
    )  # fmt: skip
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "agentrunner", "worker", "-c", "1", "-Q", queue, "-B",
         "-s", str(tmp_path / "beat-schedule"), "--without-heartbeat", "--without-gossip", "--without-mingle",
         "-l", "info"],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        llm.responder = slow_fixer
        task = registry.task_create(
            title="through a broker outage", instructions="make add() add", repository=repository, max_attempts=3
        )
        enqueued = subprocess.run(
            manage_command("runagent", "--enqueue", str(task.pk)), env=env, capture_output=True, text=True, timeout=60
        )
        assert enqueued.returncode == 0, enqueued.stderr
        wait_for(
            lambda: Slot.objects.filter(state="leased").exists() and len(llm.requests) >= 2,
            timeout=90,
            message="the worker to lease a slot and call the model",
        )

        own_redis.stop()
        outage_began = time.monotonic()
        try:
            # While the broker is still away, the worker has ended the attempt and freed the slot.
            wait_for(
                lambda: Attempt.objects.filter(task=task, number=1).exclude(outcome="running").exists(),
                timeout=OUTAGE_SECONDS - 2,
                message="the running attempt to end while the broker is down",
            )
            attempt = Attempt.objects.get(task=task, number=1)
            assert attempt.outcome == "retry" and attempt.failure_reason == "infrastructure_error", (
                attempt.outcome,
                attempt.message,
            )
            wait_for(lambda: not Slot.objects.filter(state="leased").exists(), timeout=5, message="the slot freed")
            assert Task.objects.get(pk=task.pk).status in ("queued", "pending")
            assert worker.poll() is None
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage_began)))  # the rest of the outage
        finally:
            own_redis.start()

        wait_for(
            lambda: Task.objects.get(pk=task.pk).status in ("succeeded", "failed", "cancelled"),
            timeout=120,
            message="the task to run again once the broker is back",
        )
        task.refresh_from_db()
        assert task.status == "succeeded", (task.failure_reason, task.failure_message, log.read_text()[-3000:])
        assert list(task.attempts.values_list("number", "outcome")) == [(1, "retry"), (2, "succeeded")]
        assert not Slot.objects.filter(state="leased").exists()
        assert Slot.objects.get(repository=repository).lease_count == 2
    finally:
        stop_process(worker, signal.SIGTERM, timeout=60)
