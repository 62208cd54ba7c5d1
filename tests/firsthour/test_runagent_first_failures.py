"""The first things that go wrong for someone trying `runagent`, each met with one clear line."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from registry import services as registry
from registry.models import Attempt, Task
from repopool.models import Slot
from tests.conftest import run_git
from tests.firsthour.helpers import free_port
from tests.llm_server import LLMServer, Reply, tool
from tests.runner.conftest import API_KEY, TEST_COMMAND
from tests.runner.helpers import child_env, manage, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        manage(*args), env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def no_llm_env(llm) -> dict[str, str]:
    env = child_env(llm)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(name)
    return env


@pytest.mark.slow
def test_missing_api_key_fails_at_once_before_creating_anything(llm, make_repo, sample_repo):
    started = time.monotonic()
    done = run("runagent", "--repo", str(make_repo(name="nokey")), "--instructions", "fix add", env=no_llm_env(llm))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "OPENAI_API_KEY is not set" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30  # no four retries of the default endpoint
    assert not Task.objects.exists() and llm.requests == []

    queued = registry.task_create(title="waiting", instructions="x", repository=sample_repo)
    for mode in ([str(queued.pk)], ["--next"], ["--loop", "--until-idle"]):
        refused = run("runagent", *mode, env=no_llm_env(llm))
        assert refused.returncode == 2 and "OPENAI_API_KEY" in refused.stderr, (mode, refused.stderr)
    queued.refresh_from_db()
    assert queued.status == "queued" and queued.attempts_count == 0  # nothing was claimed


@pytest.mark.slow
def test_a_local_server_may_need_no_key(llm, make_repo):
    """OPENAI_BASE_URL without a key is allowed: Ollama and friends take none."""
    keyless = LLMServer().start()
    try:
        from tests.runner.conftest import fixer

        keyless.responder = fixer
        env = no_llm_env(llm) | {"OPENAI_BASE_URL": keyless.base_url}
        done = run(
            "runagent", "--repo", str(make_repo(name="local")), "--instructions", "make add() add",
            "--test-command", TEST_COMMAND, "--quiet", env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert keyless.requests and "status    succeeded" in done.stdout
    finally:
        keyless.stop()


def test_unreachable_endpoint_is_named_each_retry_is_shown_and_the_task_is_queued_again(llm, sample_repo):
    port = free_port()  # nothing listens there
    task = registry.task_create(title="offline", instructions="fix add", repository=sample_repo, max_attempts=3)
    env = child_env(llm, OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1", AGENTRUNNER_LLM_MAX_RETRIES="2",
                    AGENTRUNNER_LLM_BACKOFF_BASE="0.1")  # fmt: skip
    done = run("runagent", str(task.pk), env=env)
    endpoint = f"http://127.0.0.1:{port}/v1"
    assert done.returncode == 1, done.stderr
    assert f"LLM unreachable at {endpoint}; retry 1/2 in 0 s" in done.stderr
    assert f"LLM unreachable at {endpoint}; retry 2/2" in done.stderr
    assert f"cannot reach {endpoint}" in done.stdout  # the reason names the endpoint
    assert API_KEY not in done.stdout + done.stderr
    assert "status    queued (llm_error)" in done.stdout
    assert f"manage.py runagent {task.pk}" in done.stdout and f"/api/tasks/{task.pk}/cancel/" in done.stdout
    task.refresh_from_db()
    assert task.status == "queued" and task.failure_reason == "llm_error"


@pytest.mark.parametrize("failure", ["bad key", "unknown model"])
def test_a_refused_key_or_unknown_model_fails_for_good(llm, sample_repo, failure):
    task = registry.task_create(title=failure, instructions="fix add", repository=sample_repo, max_attempts=3)
    if failure == "bad key":
        env = child_env(llm, OPENAI_API_KEY="sk-wrong-key-0123456789")
        expected = f"{llm.base_url} refused the API key"
    else:
        llm.models = {"test-model"}
        env = child_env(llm, AGENTRUNNER_LLM_MODEL="no-such-model")
        expected = "no-such-model"
    done = run("runagent", str(task.pk), env=env)
    assert done.returncode == 1, done.stderr
    assert "status    failed (llm_error)" in done.stdout and expected in done.stdout
    assert "queued again" not in done.stdout and "sk-wrong-key" not in done.stdout + done.stderr
    assert len(llm.requests) == 1  # not retried
    task.refresh_from_db()
    assert task.status == "failed" and task.failure_reason == "llm_error" and task.attempts_count == 1


def test_enqueue_without_a_broker_is_refused(llm, make_repo, sample_repo):
    env = child_env(llm)
    env.pop("CELERY_BROKER_URL", None)
    done = run("runagent", "--repo", str(make_repo(name="enq")), "--instructions", "x", "--enqueue", env=env)
    assert done.returncode == 2 and "CELERY_BROKER_URL" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "enqueued" not in done.stdout
    assert not Task.objects.exists()
    queued = registry.task_create(title="stay", instructions="x", repository=sample_repo)
    done = run("runagent", "--enqueue", str(queued.pk), env=env)
    assert done.returncode == 2 and "enqueued" not in done.stdout and llm.requests == []
    queued.refresh_from_db()
    assert queued.status == "queued" and queued.attempts_count == 0  # not run eagerly here


def test_every_option_has_help():
    from agentrunner.management.commands.runagent import Command

    parser = Command().create_parser("manage.py", "runagent")
    missing = [action.option_strings or action.dest for action in parser._actions if not action.help]
    assert len(parser._actions) > 20 and not missing, missing


def test_a_closed_output_pipe_winds_the_task_down(llm, sample_repo):
    """`runagent … | head -3`: once the reader is gone the slot is released and the task queued."""
    llm.responder = lambda request: Reply(body=tool("list_files"), delay=0.2)
    task = registry.task_create(title="piped", instructions="fix add", repository=sample_repo, max_attempts=3)
    child = subprocess.Popen(
        manage("runagent", str(task.pk)), env=child_env(llm), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    for _ in range(200):
        if b"step" in child.stdout.readline():  # the agent is running: a slot is leased
            break
    child.stdout.close()  # what `head` does after its lines
    assert child.wait(timeout=60) == 130
    task.refresh_from_db()
    assert task.status == "queued" and task.failure_reason == "infrastructure_error"
    assert Attempt.objects.get(task=task).outcome == "retry"
    slot = Slot.objects.get(repository=sample_repo, lease_count=1)
    assert slot.state == "free" and run_git(Path(slot.path), "status", "--porcelain") == ""


@pytest.mark.slow
def test_an_interrupted_demo_task_keeps_its_replay_whoever_runs_it(llm):
    """The demo's output goes to a closed pipe; `runagent --next` later replays it, never calling
    the configured model."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        demo = subprocess.run(manage("demo"), env=child_env(llm), stdout=write_end, stderr=write_end, timeout=120)
    finally:
        os.close(write_end)
    assert demo.returncode == 130
    task = Task.objects.get(title="Fix calc.add")
    assert task.status == "queued" and task.llm_config["provider"] == "replay"
    assert "key" not in str(task.llm_config).lower()

    done = run("runagent", "--next", env=child_env(llm))
    assert done.returncode == 0, done.stdout + done.stderr
    assert llm.requests == []  # replayed, not sent to the configured model
    assert "replayed: recorded cost $" in done.stdout and "spent $0" in done.stdout
    task.refresh_from_db()
    assert task.status == "succeeded" and not task.cost_usd
    wait_for(lambda: not Slot.objects.filter(state="leased").exists(), timeout=5, message="the slot's release")


def test_a_stored_config_cannot_send_the_key_elsewhere(llm, sample_repo):
    """Only the provider and its transcript are taken from a task: never a base URL or a key."""
    from agentrunner.runner.pipeline import run_task
    from tests.runner.conftest import fixer

    llm.responder = fixer
    elsewhere = LLMServer().start()
    try:
        task = registry.task_create(
            title="stored", instructions="fix add", repository=sample_repo,
            llm_config={"provider": "openai", "base_url": elsewhere.base_url, "api_key": "sk-stored"},
        )  # fmt: skip
        summary = run_task(task_id=task.pk)
        assert summary.status == "succeeded"
        assert elsewhere.requests == [] and llm.requests
        assert all(h["authorization"] == f"Bearer {API_KEY}" for h in llm.headers)
    finally:
        elsewhere.stop()


def test_a_reporter_failing_while_winding_down_does_not_strand_the_task(llm, sample_repo):
    """Interrupted in the agent phase, then the reporter fails again on every later line: the slot
    is still released and the task queued again."""
    from agentrunner.runner.pipeline import run_task

    llm.responder = lambda request: tool("list_files")

    def progress(info):
        if info.get("phase") == "agent":
            raise KeyboardInterrupt
        if info.get("phase") in ("artifacts", "release", "finish"):
            raise BrokenPipeError

    task = registry.task_create(title="reporter", instructions="fix add", repository=sample_repo, max_attempts=3)
    with pytest.raises(KeyboardInterrupt):
        run_task(task_id=task.pk, progress=progress)
    task.refresh_from_db()
    assert task.status == "queued" and task.failure_reason == "infrastructure_error"
    assert Slot.objects.get(repository=sample_repo, lease_count=1).state == "free"
