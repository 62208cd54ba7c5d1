"""Test results as data through the real pipeline, and a final test run that is not a repeat."""

from __future__ import annotations

import sys

import pytest

from agentrunner.runner.pipeline import run_task
from registry import services as registry
from registry.models import Attempt, Task
from repopool import services as pool
from tests.llm_server import tool

pytestmark = pytest.mark.django_db(transaction=True)

# pytest writes JUnit XML where the runner says; no plugin of ours is needed.
JUNIT_COMMAND = f'{sys.executable} -m pytest -q -p no:cacheprovider --junitxml="$AGENTRUNNER_JUNIT_XML"'


def _repo(make_repo, name="sample", **kw):
    return pool.repository_create(
        name=name, url=str(make_repo()), pool_size=1, test_command=kw.pop("test_command", JUNIT_COMMAND), **kw
    )


def _test_runs(task) -> list[dict]:
    return [e.data for e in task.events.filter(type="tests").order_by("seq")]


def test_failing_tests_reach_the_agent_and_the_api_as_data(llm, make_repo, api, user):
    repo = _repo(make_repo)
    llm.add(
        tool("edit_file", path="calc.py", old_text="a - b", new_text="a * b"),
        tool("finish", summary="first try"),
        tool("edit_file", path="calc.py", old_text="a * b", new_text="a + b"),
        tool("finish", summary="second try"),
    )
    task = registry.task_create(title="Fix add", instructions="make add() add", repository=repo, owner=user)
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded", summary.message

    # Round two starts from the failing test and its message, not from the output's last lines.
    feedback = llm.requests[2]["messages"][-1]["content"]
    assert "Its results:" in feedback and "Test results (junit): 1 failed." in feedback
    assert "FAILED: test_calc::test_add" in feedback and "assert 6 == 5" in feedback
    first, final = _test_runs(task)
    assert first["results"] == {
        "source": "junit", "passed": 0, "failed": 1, "errored": 0, "skipped": 0, "failing": ["test_calc::test_add"],
    }  # fmt: skip
    assert final["results"]["passed"] == 1 and final["results"]["failed"] == 0

    body = api.get(f"/api/tasks/{task.pk}/").json()
    assert body["test_results"]["passed"] == 1 and body["test_results"]["source"] == "junit"
    assert summary.test_results["passed"] == 1


def test_summary_line_is_used_without_junit(llm, make_repo):
    repo = _repo(make_repo, test_command=f"{sys.executable} -m pytest -q -p no:cacheprovider")
    llm.add(
        tool("edit_file", path="calc.py", old_text="a - b", new_text="a * b"),
        tool("finish", summary="wrong"),
    )
    task = registry.task_create(
        title="Fix add", instructions="make add() add", repository=repo, max_iterations=1, max_attempts=1
    )
    run_task(task_id=task.pk)
    task.refresh_from_db()
    assert task.status == "failed" and task.failure_reason == "tests_failed"
    assert task.test_results["source"] == "pytest" and task.test_results["failed"] == 1
    assert task.test_results["failures"][0]["test"] == "test_calc.py::test_add"


def _fix_then_test_then_finish(llm, *, edit_after_tests=False):
    steps = [
        tool("edit_file", path="calc.py", old_text="a - b", new_text="a + b"),
        tool("run_tests"),
    ]
    if edit_after_tests:
        steps.append(tool("write_file", path="NOTES.md", content="fixed add\n"))
    steps.append(tool("finish", summary="add() adds"))
    llm.add(*steps)


def test_final_run_reuses_the_agents_passing_run_on_the_same_tree(llm, make_repo):
    repo = _repo(make_repo)
    _fix_then_test_then_finish(llm)
    task = registry.task_create(title="Fix add", instructions="make add() add", repository=repo)
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded" and summary.tests_reused
    runs = _test_runs(task)
    assert [r.get("reused", False) for r in runs] == [False, True] and runs[1]["final"]
    attempt = Attempt.objects.get(task=task)
    assert attempt.metrics["test_runs"] == 1  # the suite ran once
    assert task.events.filter(type="tests", message__contains="not run again").exists()
    task.refresh_from_db()
    assert task.tests_passed and task.test_results["passed"] == 1


def test_any_change_since_the_agents_run_means_a_fresh_final_run(llm, make_repo):
    repo = _repo(make_repo)
    _fix_then_test_then_finish(llm, edit_after_tests=True)
    task = registry.task_create(title="Fix add", instructions="make add() add", repository=repo)
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded" and not summary.tests_reused
    assert [r.get("reused", False) for r in _test_runs(task)] == [False, False]
    assert Attempt.objects.get(task=task).metrics["test_runs"] == 2


def test_a_flaky_suite_setting_forces_a_fresh_final_run(llm, make_repo):
    repo = _repo(make_repo, rerun_final_tests=True)
    _fix_then_test_then_finish(llm)
    task = registry.task_create(title="Fix add", instructions="make add() add", repository=repo)
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded" and not summary.tests_reused
    assert Attempt.objects.get(task=task).metrics["test_runs"] == 2
    assert Task.objects.get(pk=task.pk).tests_passed
