"""PostgreSQL restarted under an in-process ``runagent --loop``: the loop waits for the database and
goes on, an attempt in flight ends recorded, and a loop whose worker dies never exits 0."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.conftest import API_KEY
from tests.faults.services import base_env, manage_command, stop_process, wait_for
from tests.llm_server import Reply, tool
from tests.runner.conftest import TEST_COMMAND, fixer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

OUTAGE_SECONDS = 10


def runner_env(pg, llm, data_dir: Path, **extra: str) -> dict[str, str]:
    return base_env(
        data_dir, pg.url, OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=llm.base_url, AGENTRUNNER_LLM_MODEL="test-model",
        AGENTRUNNER_LLM_BACKOFF_BASE="0.01", AGENTRUNNER_SLOT_WAIT_SECONDS="1", AGENTRUNNER_LOG_LEVEL="INFO", **extra,
    )  # fmt: skip


def shell(env: dict[str, str], code: str) -> str:
    done = subprocess.run(manage_command("shell", "-c", code), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def create_repository(env: dict[str, str], origin: Path) -> None:
    shell(
        env,
        "from repopool import services as pool; "
        f"pool.repository_create(name='sample', url={str(origin)!r}, pool_size=2, "
        f"test_command={TEST_COMMAND!r}, keep_paths=['.venv'])",
    )


def create_task(env: dict[str, str], title: str) -> str:
    return shell(
        env,
        "from registry import services as r; from repopool.models import Repository; "
        f"print(r.task_create(title={title!r}, instructions='make add() add', "
        "repository=Repository.objects.get(name='sample'), max_attempts=3).pk)",
    ).splitlines()[-1]


def start_loop(env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        manage_command("runagent", "--loop", "--quiet", *extra),
        env=env,
        stdout=open(log.with_suffix(".out"), "w"),
        stderr=open(log, "w"),
    )


def status_of(pg, task_id: str) -> str:
    return pg.value("SELECT status FROM registry_task WHERE id = %s", task_id)


def connections(pg) -> int:
    """Connections to the test's database, not counting the one asking."""
    return pg.value("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", pg.dbname)


def slow_fixer(request):
    """The sample project's fix, after a few slow looks around (the database goes away meanwhile)."""
    done = sum(1 for m in request["messages"] if m["role"] == "tool")
    if done < 6:
        return Reply(body=tool("list_files"), delay=0.5)
    return {6: tool("edit_file", path="calc.py", old_text="a - b", new_text="a + b"), 7: tool("run_tests")}.get(
        done, tool("finish", summary="add() now adds")
    )


def outage(pg, process: subprocess.Popen, seconds: float = OUTAGE_SECONDS) -> None:
    """The database stops for ``seconds``; the runner process must live through it."""
    pg.server.stop()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert process.poll() is None, f"the loop exited with {process.returncode} while the database was down"
            time.sleep(0.25)
    finally:
        pg.server.start()


def test_loop_survives_postgres_restarts_idle_and_mid_task(pg, llm, make_repo, tmp_path):
    env = runner_env(pg, llm, tmp_path / "data")
    create_repository(env, make_repo())
    log = tmp_path / "runagent.log"
    process = start_loop(env, log, "--concurrency", "2")
    try:
        # Idle: both workers poll for tasks; the database goes away and comes back.
        wait_for(
            lambda: connections(pg) >= 2,
            message="the loop's workers to connect",
        )
        outage(pg, process)
        llm.responder = fixer
        first = create_task(env, "after an idle outage")
        wait_for(lambda: status_of(pg, first) in ("succeeded", "failed"), timeout=90, message="the first task to end")
        assert status_of(pg, first) == "succeeded", log.read_text()
        assert process.poll() is None

        # Mid-task: the model answers slowly, the database goes away while the agent works.
        llm.responder = slow_fixer
        calls_before = len(llm.requests)
        second = create_task(env, "through a mid-task outage")
        wait_for(lambda: len(llm.requests) >= calls_before + 2, timeout=60, message="the agent to call the model")
        assert status_of(pg, second) == "running"
        outage(pg, process)
        wait_for(
            lambda: status_of(pg, second) in ("succeeded", "failed"), timeout=120, message="the second task to end"
        )
        assert status_of(pg, second) == "succeeded", log.read_text()
        attempts = pg.query(
            "SELECT a.number, a.outcome, a.failure_reason, a.message FROM registry_attempt a "
            "JOIN registry_task t ON t.id = a.task_id WHERE t.id = %s ORDER BY a.number",
            second,
        )
        # The attempt in flight ended recorded: it succeeded, or failed for the infrastructure and
        # its task ran again; never lost in `running`, never a TypeError.
        first_attempt = attempts[0]
        assert first_attempt[1] == "succeeded" or (
            first_attempt[1] == "retry" and first_attempt[2] == "infrastructure_error"
        ), attempts
        assert attempts[-1][1] == "succeeded"
        assert not any("TypeError" in (a[3] or "") for a in attempts), attempts
        assert pg.value("SELECT count(*) FROM repopool_slot WHERE state = 'leased'") == 0

        # A task created after both outages is still picked up by the same process.
        llm.responder = fixer
        third = create_task(env, "after both outages")
        wait_for(lambda: status_of(pg, third) == "succeeded", timeout=90, message="the third task")
        assert process.poll() is None
        err = log.read_text()
        assert "Traceback" not in err and "TypeError" not in err, err
        # Each outage is said once (not once per poll), and so is its end.
        assert err.count("database unavailable") == 2, err
        assert err.count("reachable again after") == 2, err
    finally:
        stop_process(process, signal.SIGTERM, timeout=60)
    assert process.returncode == 0, log.read_text()


def test_loop_whose_worker_dies_exits_non_zero_saying_why(pg, llm, make_repo, tmp_path):
    """A worker that dies of an error of this host (here: its run folder cannot be made) stops the
    process with a non-zero code and the reason, instead of leaving a live process that runs nothing
    or exiting 0."""
    data = tmp_path / "data"
    env = runner_env(pg, llm, data)
    create_repository(env, make_repo())
    llm.responder = fixer
    log = tmp_path / "runagent.log"
    process = start_loop(env, log)
    try:
        wait_for(
            lambda: connections(pg) >= 1,
            message="the loop to connect",
        )
        shutil.rmtree(data / "tmp")
        (data / "tmp").write_text("not a folder")  # where run folders go: the disk was replaced under us
        task_id = create_task({**env, "AGENTRUNNER_DATA_DIR": str(tmp_path / "elsewhere")}, "on a broken host")
        process.wait(timeout=90)
    finally:
        stop_process(process)
    err = log.read_text()
    assert process.returncode == 4, err
    assert "worker" in err and "died" in err and "tmp" in err, err
    # The task it had claimed is not left running: it goes back to the queue.
    assert status_of(pg, task_id) in ("queued", "pending"), err
