"""`manage.py runagent` as a remote runner: a separate process with an API URL, a runner token and a
data folder of its own, no database and no access to the server's data folder, completes a task
that the server (gunicorn, on the test database) hands it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from registry import services as registry
from registry.models import Attempt, Task
from runners.models import RunnerHost
from tests.conftest import run_git
from tests.runner.conftest import API_KEY, fixer
from tests.runner.served import ROOT

pytestmark = pytest.mark.django_db(transaction=True)

UNREACHABLE_DB = "postgres://postgres:pw@127.0.0.1:9/nowhere"  # the discard port: nothing answers


def remote_env(*, data_dir: Path, llm, token: str, server: str = "", database: str | None) -> dict[str, str]:
    """A runner host's environment: none of the server's settings, its own data folder."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI", "AGENTRUNNER_", "DJANGO_", "CELERY_", "ARTIFACTS_", "REPO_POOL_"))
        and k not in ("DATABASE_URL", "TASK_REGISTRY_URL", "REPO_POOL_URL", "ARTIFACT_STORE_URL")
    }
    env.update(
        PYTHONPATH=str(ROOT),
        AGENTRUNNER_DATA_DIR=str(data_dir),
        AGENTRUNNER_RUNNER_TOKEN=token,
        AGENTRUNNER_HOST="remote-host-1",
        AGENTRUNNER_LOG_LEVEL="WARNING",
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=llm.base_url,
        AGENTRUNNER_LLM_MODEL="test-model",
        AGENTRUNNER_SLOT_WAIT_SECONDS="5",
    )
    if server:
        env["AGENTRUNNER_API_URL"] = server
    if database is not None:
        env["DATABASE_URL"] = database
    return env


def runagent(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "runagent", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("database", [None, UNREACHABLE_DB], ids=["no-database-url", "unreachable-database"])
def test_a_remote_runagent_completes_a_task_without_a_database(
    database, api_server, runner_token, llm, sample_repo, tmp_path, settings
):
    llm.responder = fixer
    task = registry.task_create(repository=sample_repo, title="Fix add", instructions="add() subtracts; make it add.")
    runner_data = tmp_path / "runner-host"
    env = remote_env(data_dir=runner_data, llm=llm, token=runner_token, database=database)

    done = runagent(str(task.pk), "--server", api_server.base_url, "--json", env=env)

    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{api_server.log()[-3000:]}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    task.refresh_from_db()
    assert summary["status"] == task.status == "succeeded", summary["message"]
    assert task.result_commit == summary["commit"] and task.tests_passed is True
    # The progress lines of the in-process runner, on stderr.
    assert "claim" in done.stderr or "allocate" in done.stderr or "agent" in done.stderr
    # The result left the runner host: it is in the server's results repository.
    results = Path(settings.RESULTS_ROOT) / "sample.git"
    assert run_git(results, "rev-parse", task.result_branch) == task.result_commit
    assert {link.role for link in task.artifact_links.all()} == {"patch", "test_report", "transcript", "log"}
    attempt = Attempt.objects.get(task=task)
    assert attempt.outcome == "succeeded"
    assert RunnerHost.objects.filter(name="remote-host-1").exists()
    # No database was touched: the default SQLite file never appeared, and with DATABASE_URL at an
    # address where nothing answers, the run went just as well.
    assert not (runner_data / "db.sqlite3").exists()
    assert not (runner_data / "test-db.sqlite3").exists()
    # The runner's own data folder holds only the runner's parts; the server's stay on the server.
    assert (runner_data / "pool" / "@remote-host-1" / "sample").is_dir()
    assert not (runner_data / "artifacts").exists() and not (runner_data / "results").exists()


def test_a_remote_runagent_loop_claims_with_the_long_poll(api_server, runner_token, llm, sample_repo, tmp_path):
    llm.responder = fixer
    for i in range(2):
        registry.task_create(repository=sample_repo, title=f"loop {i}", instructions="make add() add")
    env = remote_env(
        data_dir=tmp_path / "loop-host", llm=llm, token=runner_token, server=api_server.base_url, database=None
    )

    done = runagent("--loop", "--until-idle", "--json", env=env)

    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    summaries = [json.loads(line) for line in done.stdout.strip().splitlines() if line.startswith("{")]
    assert [s["status"] for s in summaries] == ["succeeded", "succeeded"]
    assert Task.objects.filter(status="succeeded").count() == 2


def test_a_remote_runagent_with_a_wrong_token_stops_before_claiming(api_server, llm, sample_repo, tmp_path):
    task = registry.task_create(repository=sample_repo, title="never run", instructions="x")
    env = remote_env(data_dir=tmp_path / "bad-host", llm=llm, token="art_r_" + "x" * 43, database=None)

    done = runagent(str(task.pk), "--server", api_server.base_url, env=env, timeout=60)

    assert done.returncode == 2, f"{done.stdout}\n{done.stderr}"
    assert "runner token" in done.stderr and "Traceback" not in done.stderr
    task.refresh_from_db()
    assert task.status == "queued" and task.attempts_count == 0


def test_repo_is_refused_in_remote_mode(llm, tmp_path):
    env = remote_env(
        data_dir=tmp_path / "host", llm=llm, token="art_r_" + "y" * 43, server="http://127.0.0.1:9", database=None
    )

    done = runagent("--repo", str(tmp_path), "--instructions", "x", env=env, timeout=60)

    assert done.returncode == 2 and "create the task through the API" in done.stderr, done.stderr
    assert not (tmp_path / "host" / "db.sqlite3").exists()


def test_the_celery_task_runs_remote_when_configured(api_server, runner_token, settings, llm, sample_repo):
    """The worker's task is the pipeline with the ports from the settings: over HTTP here."""
    from agentrunner.tasks import run_agent_task
    from tests.runner.conftest import use_server

    use_server(settings, api_server.base_url, runner_token)
    llm.responder = fixer
    task = registry.task_create(repository=sample_repo, title="Fix add", instructions="make add() add")
    assert run_agent_task.apply(args=[str(task.pk)]).get() == "succeeded"
    task.refresh_from_db()
    assert task.status == "succeeded"
    # The slot it used belongs to the remote host's pool: the work went through the runner API.
    from repopool.models import Slot

    assert set(Slot.objects.filter(repository=sample_repo).values_list("host", flat=True)) == {"test-host"}


# --- a runner host without a live model -------------------------------------------------------------
def no_model_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("OPENAI_")}


def test_a_remote_runner_without_a_model_runs_a_replayed_task(api_server, runner_token, llm, tmp_path):
    """A replayed task (the demo's) needs no model: the runner must not refuse to start for want of one."""
    from agentrunner.management.commands.demo import INSTRUCTIONS, TRANSCRIPT
    from tests.inspector.runs import demo_repository

    repository = demo_repository(tmp_path)
    task = registry.task_create(
        title="Fix calc.add", instructions=INSTRUCTIONS, repository=repository, max_steps=20, max_iterations=1,
        llm_config={"provider": "replay", "replay_file": str(TRANSCRIPT)},
    )  # fmt: skip
    env = no_model_env(remote_env(data_dir=tmp_path / "replay-host", llm=llm, token=runner_token, database=None))

    done = runagent("--next", "--server", api_server.base_url, "--quiet", env=env)

    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    task.refresh_from_db()
    assert task.status == "succeeded" and llm.requests == []
    assert "OPENAI_API_KEY" in done.stderr  # said once at start: only replayed tasks can run here


def test_a_remote_runner_without_a_model_leaves_tasks_that_need_one_queued(
    api_server, runner_token, llm, sample_repo, tmp_path
):
    """It claims only tasks that replay a transcript: a task that needs a model stays queued for
    other runners with all its attempts (it used to be claimed and given back, an attempt spent
    each time such a runner started). One named is given back and stops the runner."""
    from agentrunner.management.commands.demo import INSTRUCTIONS, TRANSCRIPT
    from tests.inspector.runs import demo_repository

    live = registry.task_create(repository=sample_repo, title="live", instructions="make add() add")
    replayed = registry.task_create(
        title="Fix calc.add", instructions=INSTRUCTIONS, repository=demo_repository(tmp_path), max_steps=20,
        max_iterations=1, llm_config={"provider": "replay", "replay_file": str(TRANSCRIPT)},
    )  # fmt: skip
    env = no_model_env(remote_env(data_dir=tmp_path / "nomodel-host", llm=llm, token=runner_token, database=None))

    first = runagent("--next", "--server", api_server.base_url, "--quiet", env=env, timeout=120)
    assert first.returncode == 0, f"{first.stdout}\n{first.stderr}"
    replayed.refresh_from_db()
    assert replayed.status == "succeeded"  # the older live task was passed over, not claimed

    for mode in (["--next"], ["--loop", "--until-idle"]):
        done = runagent(*mode, "--server", api_server.base_url, "--quiet", env=env, timeout=60)
        assert done.returncode == (3 if mode == ["--next"] else 0), (mode, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
    assert "transcript" in done.stderr  # said at start: what this runner can run
    live.refresh_from_db()
    assert live.status == "queued" and live.attempts.count() == 0 and llm.requests == []

    named = runagent(str(live.pk), "--server", api_server.base_url, "--quiet", env=env, timeout=60)
    assert named.returncode == 2, (named.stdout, named.stderr)
    last = named.stderr.strip().splitlines()[-1]
    assert "OPENAI_API_KEY" in last and str(live.pk) in last and "queue" in last, named.stderr
    live.refresh_from_db()
    (attempt,) = live.attempts.all()
    assert live.status == "queued" and attempt.outcome == "retry" and "OPENAI_API_KEY" in attempt.message
