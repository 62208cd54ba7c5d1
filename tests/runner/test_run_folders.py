"""A runner killed mid-task leaves its run folder; the next attempt of the task on this host keeps
its transcript and logs as artifacts of the killed attempt, and removes the folder."""

from __future__ import annotations

import pytest
from django.conf import settings

from agentrunner.runner.pipeline import run_task
from registry import services as registry
from registry.models import TaskEvent
from tests.llm_server import tool

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = b"DATABASE_URL=postgres://admin:hunter2@db/prod\n"


def leave_run_folder(task, attempt: int, files: dict[str, bytes]):
    folder = settings.TMP_ROOT / f"run-{task.pk.hex}-{attempt}"
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def kill_first_attempt(task):
    """Attempt 1 ends as a killed runner's does once the reaper has found it: re-queued."""
    _, attempt = registry.task_claim(runner_id="host:999 (killed)", task_id=task.pk)
    registry.task_finish(
        task_id=task.pk, attempt_id=attempt.pk, status="failed", failure_reason="infrastructure_error",
        message="the runner stopped heartbeating", retry=True,
    )  # fmt: skip


def test_next_attempt_adopts_the_killed_attempts_run_folder(llm, sample_repo, tmp_path):
    task = registry.task_create(title="t", instructions="fix add", repository=sample_repo, max_attempts=3)
    kill_first_attempt(task)
    secret = tmp_path / "secret.env"
    secret.write_bytes(SECRET)
    folder = leave_run_folder(
        task,
        1,
        {
            "transcript.jsonl": b'{"type": "request", "step": 1}\n',
            "run.log": b"[   0.001s] claimed task\n[   0.200s] phase agent\n",
            "tests-1.log": b"1 failed\n",
            "notes.txt": b"not an artifact",
        },
    )
    (folder / "tests-2.log").symlink_to(secret)  # planted by hostile tests: never followed
    other = leave_run_folder(registry.task_create(title="o", instructions="x", repository=sample_repo), 1, {})

    llm.responder = lambda request: tool("finish", summary="nothing to do")  # a short attempt 2
    summary = run_task(task_id=task.pk)

    assert summary.attempt == 2 and summary.failure_reason == "implementation_failed"
    assert not folder.exists() and other.exists()
    recovered = {
        link.artifact.name: link for link in task.artifact_links.select_related("artifact").filter(attempt_number=1)
    }
    assert set(recovered) == {"transcript-attempt1.jsonl", "run-attempt1.log", "tests-attempt1-run1.log"}
    assert {name: link.role for name, link in recovered.items()} == {
        "transcript-attempt1.jsonl": "transcript",
        "run-attempt1.log": "log",
        "tests-attempt1-run1.log": "test_report",
    }
    from artifacts.services import artifact_open

    for name, content in [("run-attempt1.log", b"phase agent"), ("transcript-attempt1.jsonl", b'"step": 1')]:
        artifact = recovered[name].artifact
        assert artifact.metadata["recovered"] is True and artifact.metadata["attempt"] == 1
        with artifact_open(artifact=artifact) as handle:
            assert content in handle.read()
    # Attempt 2 has its own artifacts, untouched by the recovery.
    assert {link.role for link in task.artifact_links.filter(attempt_number=2)} == {"transcript", "log"}
    from artifacts.models import Artifact

    assert not Artifact.objects.filter(sha256=__import__("hashlib").sha256(SECRET).hexdigest()).exists()
    event = TaskEvent.objects.get(task=task, type="run_recovered")
    assert event.data["attempt"] == 1 and event.data["skipped"] == ["tests-2.log"]
    assert set(event.data["files"]) == {"run.log", "tests-1.log", "transcript.jsonl"}
    assert not (settings.SPOOL_ROOT / task.pk.hex).exists()


def test_a_planted_link_at_the_attempts_own_run_folder_is_replaced(sample_repo, tmp_path):
    """The attempt's own folder name is predictable: whatever holds it is removed, never written
    through (a link would send the run log and transcript elsewhere)."""
    from agentrunner.runner.pipeline import TaskRun
    from agentrunner.runner.ports import Ports

    task = registry.task_create(title="t", instructions="fix add", repository=sample_repo)
    target = tmp_path / "elsewhere"
    target.mkdir()
    planted = settings.TMP_ROOT / f"run-{task.pk.hex}-1"
    planted.symlink_to(target)
    ports = Ports.local()
    run = TaskRun(ports.registry.claim(runner_id="r", task_id=task.pk), ports, "r", None)
    run.log("a line of the run log")
    run.log.close()
    assert list(target.iterdir()) == []
    assert not planted.is_symlink() and planted.is_dir()
    assert (planted / "run.log").read_text().endswith("a line of the run log\n")
    assert planted.stat().st_mode & 0o777 == 0o700


def test_recovered_files_wait_in_the_spool_while_the_store_is_down(llm, sample_repo, settings, tmp_path):
    task = registry.task_create(title="t", instructions="fix add", repository=sample_repo, max_attempts=3)
    kill_first_attempt(task)
    folder = leave_run_folder(task, 1, {"run.log": b"attempt one's log\n"})
    good_storage = settings.STORAGES
    broken_root = tmp_path / "not-a-folder"
    broken_root.write_text("a file where the artifact folder should be")
    settings.STORAGES = {
        **good_storage,
        "artifacts": {**good_storage["artifacts"], "OPTIONS": {"location": str(broken_root / "x")}},
    }
    llm.responder = lambda request: tool("finish", summary="nothing to do")
    run_task(task_id=task.pk)
    assert not folder.exists()  # adopted: its files now wait in the spool
    assert not task.artifact_links.filter(attempt_number=1).exists()
    assert (settings.SPOOL_ROOT / task.pk.hex / "1-recovered-log" / "content").read_bytes() == b"attempt one's log\n"

    settings.STORAGES = good_storage
    registry.task_retry(task_id=task.pk)
    run_task(task_id=task.pk)
    link = task.artifact_links.select_related("artifact").get(attempt_number=1)
    assert link.role == "log" and link.artifact.name == "run-attempt1.log"
    assert link.artifact.metadata["recovered"] is True
    assert not (settings.SPOOL_ROOT / task.pk.hex).exists()
