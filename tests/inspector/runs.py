"""Real runs for the inspector's tests: the demo's sample project, the real pipeline, and the
model's answers replayed from the transcript shipped with the project (provider ``replay``)."""

from __future__ import annotations

import sys
from pathlib import Path

from agentrunner.management.commands.demo import INSTRUCTIONS, TRANSCRIPT, make_sample_project
from agentrunner.runner.pipeline import run_task
from registry import services as registry
from registry.models import Task
from repopool import services as pool

# Fast stand-ins for pytest (the replay does not look at tool results, only at the conversation's
# shape): one passes once add() adds, one always fails with pytest-like output.
PASSING_TESTS = f"{sys.executable} -c \"import calc; assert calc.add(2, 3) == 5; print('2 passed in 0.01s')\""
FAILING_TESTS = (
    f"{sys.executable} -c \"print('test_calc.py F'); print('FAILED test_calc.py::test_add - assert -1 == 5'); "
    f"print('1 failed in 0.02s'); raise SystemExit(1)\""
)


def demo_repository(tmp_path: Path, *, name: str = "demo-sample", test_command: str = PASSING_TESTS):
    project = make_sample_project(tmp_path / f"project-{name}")
    return pool.repository_create(name=name, url=str(project), pool_size=1, test_command=test_command)


def replay_run(repository, *, owner=None, title: str = "Fix calc.add", max_attempts: int = 1) -> Task:
    """Create a task like the demo's and run it to its end through the real pipeline."""
    task = registry.task_create(
        title=title,
        instructions=INSTRUCTIONS,
        repository=repository,
        max_steps=20,
        max_attempts=max_attempts,
        max_iterations=1,
        owner=owner,
    )
    run_task(task_id=task.pk, llm_overrides={"provider": "replay", "replay_file": str(TRANSCRIPT)})
    task.refresh_from_db()
    return task
