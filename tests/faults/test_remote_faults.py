"""Faults between a remote runner and the server: the server killed mid-run, a runner host cut off
past its lease (its own network namespace, the link set down), a runner token revoked mid-run.

The server is gunicorn on the test database; each runner is `manage.py runagent` in a process of its
own holding only the API URL and a runner token (its DATABASE_URL points nowhere)."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from registry import services as registry
from registry.models import Task, TaskEvent
from repopool import services as pool
from repopool.models import Slot
from runners import services as runners
from tests.faults.conftest import API_KEY
from tests.faults.services import (
    SERVER_PORTS,
    RunnerNetns,
    Server,
    base_env,
    free_port,
    manage_command,
    stop_process,
    wait_for,
)
from tests.llm_server import Reply, tool
from tests.runner.conftest import TEST_COMMAND
from tests.runner.helpers import database_url

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

NOWHERE_DB = "postgres://nobody@127.0.0.1:9/not-for-runners"  # a remote runner never connects to it


def slow_fixer(steps: int, delay: float):
    """Looks around slowly (``steps`` calls of ``delay`` s), then fixes add(), runs the tests and
    finishes. Each look reads a different file, so no two of its events are alike."""

    def respond(request):
        done = sum(1 for m in request["messages"] if m["role"] == "tool")
        if done < steps:
            return Reply(body=tool("read_file", path="calc.py" if done % 2 else "test_calc.py"), delay=delay)
        if done == steps:
            return tool("edit_file", path="calc.py", old_text="a - b", new_text="a + b")
        if done == steps + 1:
            return tool("run_tests")
        return tool("finish", summary="add() now adds")

    return respond


def runner_env(data_dir: Path, api_url: str, token: str, host: str, model_url: str, **extra: str) -> dict[str, str]:
    return base_env(
        data_dir, NOWHERE_DB, AGENTRUNNER_API_URL=api_url, AGENTRUNNER_RUNNER_TOKEN=token, AGENTRUNNER_HOST=host,
        OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=model_url, AGENTRUNNER_LLM_MODEL="test-model",
        AGENTRUNNER_LLM_BACKOFF_BASE="0.01", AGENTRUNNER_SLOT_WAIT_SECONDS="1", AGENTRUNNER_LOG_LEVEL="INFO",
        AGENTRUNNER_API_BACKOFF_BASE="0.1", AGENTRUNNER_API_BACKOFF_MAX="2", AGENTRUNNER_API_CONNECT_TIMEOUT="2",
        AGENTRUNNER_API_READ_TIMEOUT="10", **extra,
    )  # fmt: skip


def start_runner(env: dict[str, str], log: Path, *args: str, wrap=lambda argv: argv) -> subprocess.Popen:
    return subprocess.Popen(
        wrap(manage_command("runagent", *args)),
        env=env,
        stdout=open(log.with_suffix(".out"), "w"),
        stderr=open(log, "w"),
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def repository(make_repo):
    return pool.repository_create(
        name="sample", url=str(make_repo()), pool_size=1, test_command=TEST_COMMAND, keep_paths=[".venv"]
    )


def assert_events_whole(task: Task) -> None:
    """The task's event log has no gap and no duplicate: seq runs 1..n, and each model call of the
    attempt is there exactly once, in order."""
    seqs = list(TaskEvent.objects.filter(task=task).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    steps = [
        data.get("step")
        for data in TaskEvent.objects.filter(task=task, type="llm_call").order_by("seq").values_list("data", flat=True)
    ]
    assert steps == list(range(1, len(steps) + 1)), steps


def test_server_killed_mid_run_and_back_20_s_later(llm, repository, tmp_path):
    server = Server(data_dir=tmp_path / "server", database_url=database_url(),
                    binds=[f"127.0.0.1:{free_port(SERVER_PORTS)}"])  # fmt: skip
    server.start()
    _token, raw = runners.runner_token_create(name="host-killed-server")
    llm.responder = slow_fixer(steps=10, delay=1.0)
    task = registry.task_create(title="through a server crash", instructions="make add() add", repository=repository)
    log = tmp_path / "runner.log"
    runner = start_runner(
        runner_env(tmp_path / "runner", server.url, raw, "host-a", llm.base_url, AGENTRUNNER_API_RETRY_SECONDS="120"),
        log,
        str(task.pk),
        "--quiet",
    )
    try:
        wait_for(lambda: len(llm.requests) >= 3, timeout=90, message="the runner to work with the model")
        server.kill()
        killed_at_request = len(llm.requests)
        time.sleep(20)  # the outage itself
        assert runner.poll() is None, log.read_text()
        assert len(llm.requests) > killed_at_request  # the agent worked on while the server was away
        server.start()
        runner.wait(timeout=240)
    finally:
        stop_process(runner)
        server.stop()
    assert runner.returncode == 0, log.read_text()[-4000:]
    task.refresh_from_db()
    assert task.status == "succeeded", (task.failure_reason, task.failure_message)
    assert list(task.attempts.values_list("number", "outcome")) == [(1, "succeeded")]
    assert_events_whole(task)
    # Every artifact arrived once: one of each kind for the attempt, each linked once.
    links = list(task.artifact_links.values_list("role", "attempt_number", "artifact__sha256"))
    roles = sorted(role for role, _, _ in links)
    assert roles == sorted(["patch", "test_report", "transcript", "log"]), links
    from artifacts.models import Artifact

    for role, _, _ in links:
        assert Artifact.objects.filter(kind=role, metadata__task=str(task.pk)).count() == 1, role
    assert not Slot.objects.filter(state="leased").exists()


def test_runner_cut_off_past_its_lease_is_reaped_and_its_late_result_discarded(llm, repository, tmp_path, settings):
    from agentrunner.reaping import reap

    netns = RunnerNetns()
    try:
        port = free_port(SERVER_PORTS)
        server = Server(
            data_dir=tmp_path / "server", database_url=database_url(),
            binds=[f"{netns.api_host}:{port}", f"127.0.0.1:{port}"],
            env={"DJANGO_ALLOWED_HOSTS": f"127.0.0.1,localhost,{netns.api_host}"},
        )  # fmt: skip
        server.start()
        # The model's server, reachable from the namespace over its own link (the outside world).
        model = ThreadingHTTPServer((netns.model_host, 0), llm._server.RequestHandlerClass)
        threading.Thread(target=model.serve_forever, daemon=True).start()
        model_url = f"http://{netns.model_host}:{model.server_address[1]}/v1"
        _a, token_a = runners.runner_token_create(name="host-cut-off")
        _b, token_b = runners.runner_token_create(name="host-other")
        llm.responder = slow_fixer(steps=8, delay=1.0)
        task = registry.task_create(
            title="through a cut link", instructions="make add() add", repository=repository, max_attempts=3
        )
        log_a = tmp_path / "runner-a.log"
        runner_a = start_runner(
            runner_env(tmp_path / "runner-a", f"http://{netns.api_host}:{port}", token_a, "host-a", model_url,
                       AGENTRUNNER_LEASE_SECONDS="6", AGENTRUNNER_ATTEMPT_STALE_SECONDS="6",
                       AGENTRUNNER_API_FINISH_RETRY_SECONDS="600"),
            log_a, str(task.pk), "--quiet", wrap=netns.command,
        )  # fmt: skip
        runner_b = None
        try:

            def working() -> bool:
                assert runner_a.poll() is None, log_a.read_text()[-3000:]
                return len(llm.requests) >= 2 and Slot.objects.filter(state="leased").exists()

            wait_for(working, timeout=90, message="the cut-off runner to lease a slot and call the model")
            first = task.attempts.get(number=1)
            netns.cut()
            cut_at = time.monotonic()
            # Past the lease and the attempt's heartbeat limit, the server's reaper takes both back.
            settings.AGENTRUNNER_ATTEMPT_STALE_SECONDS = 6

            def reaped() -> bool:
                reap()
                first.refresh_from_db()
                return first.outcome == "lost" and not Slot.objects.filter(state="leased").exists()

            wait_for(reaped, timeout=90, interval=1.0, message="the reaper to take the attempt and slot back")
            assert Task.objects.get(pk=task.pk).status == "queued"
            assert runner_a.poll() is None  # still working, cut off

            # Another runner (this host's own network) runs the task again, to success.
            log_b = tmp_path / "runner-b.log"
            runner_b = start_runner(
                runner_env(tmp_path / "runner-b", f"http://127.0.0.1:{port}", token_b, "host-b", llm.base_url),
                log_b, str(task.pk), "--quiet",
            )  # fmt: skip
            runner_b.wait(timeout=240)
            assert runner_b.returncode == 0, log_b.read_text()[-4000:]
            task.refresh_from_db()
            assert task.status == "succeeded"
            winner = task.result_commit
            assert winner

            # The link comes back: the cut-off runner learns its lease is gone and drops its result.
            assert time.monotonic() - cut_at > 6
            netns.restore()
            runner_a.wait(timeout=240)
        finally:
            for process in (runner_a, runner_b):
                if process is not None:
                    stop_process(process)
            server.stop()
        err_a, out_a = log_a.read_text(), log_a.with_suffix(".out").read_text()
        assert runner_a.returncode != 0, err_a[-4000:]
        # It says the attempt is no longer its own, and its result went nowhere (no fetch hint).
        assert re.search(r"^status\s+lost\b", out_a, re.M) and "is lost" in out_a, out_a
        assert re.search(r"^fetch\s*$", out_a, re.M), out_a
        assert "no longer ours" in err_a and "Traceback" not in err_a, err_a[-4000:]
        task.refresh_from_db()
        assert task.status == "succeeded" and task.result_commit == winner
        outcomes = list(task.attempts.values_list("number", "outcome", "runner_id"))
        assert [(n, o) for n, o, _ in outcomes] == [(1, "lost"), (2, "succeeded")], outcomes
        assert outcomes[0][2] != outcomes[1][2]  # run again by another runner
        # Exactly one result commit recorded: one `committed` event, the branch at the winner's commit.
        committed = list(TaskEvent.objects.filter(task=task, type="committed").values_list("data", flat=True))
        assert len(committed) == 1 and committed[0]["commit"] == winner, committed
        branch = subprocess.run(
            ["git", "--git-dir", str(tmp_path / "server" / "results" / f"{repository.name}.git"), "rev-parse",
             f"refs/heads/agent/{task.short_id}"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert branch.stdout.strip() == winner, branch.stderr
        assert not Slot.objects.filter(state="leased").exists()
    finally:
        netns.destroy()


def test_runner_token_revoked_mid_run_stops_the_runner_cleanly(llm, repository, tmp_path, settings):
    from agentrunner.reaping import reap

    server = Server(data_dir=tmp_path / "server", database_url=database_url(),
                    binds=[f"127.0.0.1:{free_port(SERVER_PORTS)}"])  # fmt: skip
    server.start()
    token, raw = runners.runner_token_create(name="host-revoked")
    llm.responder = slow_fixer(steps=20, delay=0.5)
    task = registry.task_create(title="token revoked", instructions="make add() add", repository=repository)
    log = tmp_path / "runner.log"
    runner = start_runner(
        runner_env(tmp_path / "runner", server.url, raw, "host-r", llm.base_url, AGENTRUNNER_LEASE_SECONDS="6"),
        log,
        "--loop",
        "--quiet",
    )
    try:
        wait_for(
            lambda: len(llm.requests) >= 2 and Slot.objects.filter(state="leased").exists(),
            timeout=90,
            message="the runner to lease a slot and call the model",
        )
        runners.runner_token_revoke(token_id=token.pk)
        runner.wait(timeout=120)
    finally:
        stop_process(runner)
        server.stop()
    err = log.read_text()
    # It stops by itself, non-zero, saying why in one line, without a traceback.
    assert runner.returncode not in (0, None), err[-4000:]
    assert "revoked" in err, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    # Its slot is not leaked: released by the runner, or reaped once its lease ran out; the attempt
    # is reaped and the task queued again.
    settings.AGENTRUNNER_ATTEMPT_STALE_SECONDS = 3

    def settled() -> bool:
        reap()
        task.refresh_from_db()
        return not Slot.objects.filter(state="leased").exists() and task.status == "queued"

    wait_for(settled, timeout=60, interval=1.0, message="the slot and the attempt to be given back")
