"""Real third-party projects end to end: a planted bug, fixed by the scripted model through the real
tools, judged by the project's own suite, committed as exactly the fix; setup runs once per slot and
the next task on that slot starts clean."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.conf import settings

from agentrunner.runner.pipeline import run_task
from registry import services as registry
from repopool import services as pool
from repopool.models import Slot
from tests.llm_server import tool
from tests.realprojects.projects import MINIMIST, MORE_ITERTOOLS, TOOLZ, Project, make_repository, run_git

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def artifact_text(task, role: str) -> str:
    from artifacts.services import artifact_open

    link = task.artifact_links.select_related("artifact").get(role=role)
    with artifact_open(artifact=link.artifact) as fh:
        return fh.read().decode()


def script_fix(llm, project: Project, slot_path: Path, line: int, seen: dict) -> None:
    """Look at the slot as leased, read around the bug, put the released line back, test, finish."""

    def look_then_read(request):
        # The first model call comes after the lease and before any tool: the slot as the task got it.
        seen["status"] = status(slot_path, project)
        seen["head"] = run_git(slot_path, "rev-parse", "HEAD")
        return tool("read_file", path=project.path, start_line=max(1, line - 3), end_line=line + 3)

    def edit(request):
        reads = [m["content"] for m in request["messages"] if m["role"] == "tool"]
        seen["read"] = reads[0]
        return tool("edit_file", path=project.path, old_text=project.bad, new_text=project.good)

    before = [tool("run_tests")] if seen.get("run_first") else []  # the suite catches the bug
    llm.add(look_then_read, *before, edit, tool("run_tests"), tool("finish", summary="restored the released behaviour"))


def status(path: Path, project: Project) -> str:
    """git status of the working copy, kept folders aside (they need not be ignored by the project)."""
    return run_git(path, "status", "--porcelain", "--", ".", *[f":(exclude){p}" for p in project.keep_paths])


def assert_patch_is_the_fix(patch: str, project: Project) -> None:
    patch = patch.split("\n-- \n")[0]  # format-patch's signature follows the diff
    assert re.findall(r"^diff --git a/(\S+)", patch, re.M) == [project.path]
    assert len(re.findall(r"^@@ ", patch, re.M)) == 1
    removed = [line[1:] for line in patch.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in patch.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert removed == [project.bad.rstrip("\n")] and added == [project.good.rstrip("\n")]


def run_two_tasks(project: Project, llm, fetched, tmp_path, user) -> tuple[Path, str]:
    origin, release = make_repository(project, fetched(project), tmp_path)
    main = run_git(origin, "rev-parse", "main")
    line = next(
        i
        for i, text in enumerate((origin / project.path).read_text().splitlines(), 1)
        if text == project.bad.rstrip("\n")
    )
    repo = pool.repository_create(
        name=project.name,
        url=str(origin),
        pool_size=1,
        setup_command=project.setup_command,
        setup_watch_files=project.setup_watch_files,
        keep_paths=project.keep_paths,
        test_command=project.test_command,
    )
    slot_path = pool.slot_path(repo, 0)
    for n in (1, 2):
        seen: dict = {"run_first": n == 1}
        script_fix(llm, project, slot_path, line, seen)
        task = registry.task_create(
            title=f"Fix {project.name} ({n})", instructions="A regression broke the tests; fix it.", repository=repo,
            owner=user,
        )  # fmt: skip
        summary = run_task(task_id=task.pk)
        assert summary.status == "succeeded", (summary.message, summary.tests_tail)
        # The slot as leased: clean, at main, the planted bug there (the first task's fix is not).
        assert seen["status"] == "" and seen["head"] == main, seen
        assert project.bad.strip() in seen["read"] and project.good.strip() not in seen["read"]
        # The project's own suite judged the fix, once: the final check is the agent's passing run.
        results = summary.test_results
        assert results["source"] == "junit" and results["failed"] == 0 and results["errored"] == 0, results
        assert results["passed"] >= project.min_passed, results
        assert summary.tests_reused
        runs = [e.data for e in task.events.filter(type="tests").order_by("seq")]
        if n == 1:  # the planted bug fails the project's own suite; the fix makes it pass
            assert runs[0]["exit_code"] != 0 and runs[0]["results"]["failed"] >= 1, runs[0]
            assert runs[1]["exit_code"] == 0 and runs[2]["reused"], runs
        else:
            assert [r["exit_code"] for r in runs] == [0, 0] and runs[1]["reused"], runs
        task.refresh_from_db()
        assert task.status == "succeeded" and task.tests_passed
        assert summary.files_changed == [project.path]
        assert_patch_is_the_fix(artifact_text(task, "patch"), project)
        # The commit holds the release again: the fix and nothing else (no .venv, no caches). It is
        # looked up where it was pushed: a reset prunes the task's objects from the slot.
        pushed = Path(settings.RESULTS_ROOT) / f"{repo.name}.git"
        assert run_git(pushed, "diff", "--stat", release, summary.commit) == ""
    slots = list(Slot.objects.filter(repository=repo))
    assert len(slots) == 1 and slots[0].state == "free", [(s.state, s.last_error) for s in slots]
    return slot_path, release


def test_pure_python_library_with_its_own_suite(llm, fetched, tmp_path, user):
    run_two_tasks(TOOLZ, llm, fetched, tmp_path, user)


@pytest.mark.parametrize("project", [MORE_ITERTOOLS, MINIMIST], ids=lambda p: p.name)
def test_setup_into_a_kept_folder_runs_once_per_slot(project, llm, fetched, tmp_path, user):
    slot_path, _ = run_two_tasks(project, llm, fetched, tmp_path, user)
    # One setup for two tasks; what it installed ran the suite and survived both resets.
    assert (slot_path / project.setup_marker).read_text() == "ran\n"
    assert status(slot_path, project) == ""
