"""Time per task on real projects (the ones tests/realprojects uses), split into setup, agent, tests
and overhead, with the final test run reusing the agent's passing run and without it.

    python bench/realprojects.py [--rounds 5] [--only toolz,minimist]

Each task: the scripted model (local server, no delay) reads the planted bug, fixes it, runs the
project's suite once and finishes, as in the tests. The two modes are interleaved, their order
alternating per round, on a pool of one warm slot per project; the table shows medians.

  setup     allocate + prepare: lease a warm slot, reset it, check the setup is current
  agent     the agent phase less the test runs inside it (model calls and tools)
  tests     every run of the project's suite (the agent's and the final one)
  overhead  the rest: commit, artifacts, release, finish, bookkeeping

The first setup of each slot (a cold pool_warm) is printed on its own.
Archives come from the registries into the same cache as the tests (fetched once).
"""

from __future__ import annotations

import argparse
import sys
import time

from _setup import ROOT, django_in_tempdir, median, temp_dir

sys.path.insert(0, str(ROOT))

MODES = {"reuse": False, "rerun": True}  # mode -> Repository.rerun_final_tests


def scripted_fix(project):
    from tests.llm_server import tool

    def respond(request):
        done = sum(1 for m in request["messages"] if m["role"] == "tool")
        steps = [
            tool("read_file", path=project.path),
            tool("edit_file", path=project.path, old_text=project.bad, new_text=project.good),
            tool("run_tests"),
            tool("finish", summary="restored the released behaviour"),
        ]
        return steps[min(done, len(steps) - 1)]

    return respond


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated project names")
    args = parser.parse_args()

    django_in_tempdir("bench-realprojects-")
    from django.conf import settings

    from agentrunner.runner.pipeline import run_task
    from registry.models import Attempt
    from registry.services import task_create
    from repopool.services import pool_warm, repository_create
    from tests.llm_server import LLMServer
    from tests.realprojects.projects import MINIMIST, MORE_ITERTOOLS, TOOLZ, fetch, make_repository

    projects = [p for p in (TOOLZ, MORE_ITERTOOLS, MINIMIST) if not args.only or p.name in args.only.split(",")]
    server = LLMServer().start()
    settings.OPENAI_BASE_URL = server.base_url
    settings.OPENAI_API_KEY = "bench"
    settings.AGENTRUNNER_LLM_MODEL = "test-model"
    work = temp_dir("bench-realprojects-src-")

    repos, cold = {}, {}
    for project in projects:
        origin, _ = make_repository(project, fetch(project), work)
        repo = repository_create(
            name=project.name, url=str(origin), pool_size=1, setup_command=project.setup_command,
            setup_watch_files=project.setup_watch_files, keep_paths=project.keep_paths,
            test_command=project.test_command,
        )  # fmt: skip
        started = time.perf_counter()
        (slot,) = pool_warm(repository=repo)
        assert slot.state == "free", slot.last_error
        cold[project.name] = time.perf_counter() - started
        repos[project.name] = repo

    def one_task(project, mode: str) -> dict[str, float]:
        repo = repos[project.name]
        repo.rerun_final_tests = MODES[mode]
        repo.save(update_fields=["rerun_final_tests"])
        server.responder = scripted_fix(project)
        task_create(
            title=f"{project.name} {mode}", instructions="A regression broke the tests; fix it.", repository=repo
        )
        summary = run_task()
        assert summary.status == "succeeded", (project.name, mode, summary.message, summary.tests_tail)
        assert summary.tests_reused == (mode == "reuse")
        metrics = Attempt.objects.get(task_id=summary.task_id).metrics
        phases, tests = metrics["phases"], metrics["test_seconds"]
        setup = phases.get("allocate", 0.0) + phases.get("prepare", 0.0)
        agent = phases.get("agent", 0.0) - (tests - _final_run(summary.task_id))  # its own runs are in there
        total = summary.timings["total"]
        return {
            "setup": setup, "agent": agent, "tests": tests, "overhead": total - setup - agent - tests, "total": total,
            "runs": metrics["test_runs"],
        }  # fmt: skip

    def _final_run(task_id) -> float:
        from registry.models import TaskEvent

        final = [e.data for e in TaskEvent.objects.filter(task_id=task_id, type="tests") if e.data.get("final")]
        return sum(d.get("duration", 0.0) for d in final if not d.get("reused"))

    for project in projects:  # one task each, not counted: imports, caches, the first connection
        one_task(project, "reuse")
    samples: dict[tuple[str, str], list[dict]] = {}
    for round_number in range(args.rounds):
        order = list(MODES) if round_number % 2 == 0 else list(reversed(MODES))
        for project in projects:
            for mode in order:
                samples.setdefault((project.name, mode), []).append(one_task(project, mode))
    server.stop()

    columns = ("setup", "agent", "tests", "overhead", "total")
    print(f"time per task, median of {args.rounds} (seconds; warm slot; scripted model, no delay)")
    print(f"{'project':16} {'final run':10} " + " ".join(f"{c:>9}" for c in columns) + "  test runs")
    for project in projects:
        for mode in MODES:
            rows = samples[(project.name, mode)]
            cells = " ".join(f"{median([r[c] for r in rows]):9.2f}" for c in columns)
            print(f"{project.name:16} {mode:10} {cells}  {int(median([r['runs'] for r in rows]))}")
    print("cold setup (first pool_warm of the slot: clone + setup command): "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in cold.items()))  # fmt: skip


if __name__ == "__main__":
    main()
