"""Runner benchmark against the local OpenAI-compatible test server with a fixed response delay.

The repository is real source: Django's own files (about 3,600) plus a small module with a bug
and its test; PostgreSQL in a scratch database, DEBUG off.

    python bench/runner.py [--tasks 20] [--delay 0.05] [--speedup-delay 1.0] [--speedup-tasks 16]

Prints (1) the runner's own overhead per task, wall time minus LLM time minus test time, median
and p95, with the time per phase; (2) the speedup of `runagent --loop --concurrency 1, 2, 4, 8`
on `--speedup-tasks` tasks whose LLM answers take `--speedup-delay` seconds each.
Targets: overhead under 250 ms per task; speedup at 8 at least 6x.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

from _setup import ROOT, build_django_repo, django_in_tempdir, median, percentile, temp_dir


def sample_repo(where: Path) -> Path:
    """Django's own source (thousands of files) plus a small module with a bug and its test."""
    where.mkdir(parents=True)
    (where / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (where / "test_calc.py").write_text("from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    build_django_repo(where)
    return where


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--speedup-delay", type=float, default=1.0)
    parser.add_argument("--speedup-tasks", type=int, default=16)
    args = parser.parse_args()

    django_in_tempdir("bench-runner-")
    sys.path.insert(0, str(ROOT))
    from django.conf import settings
    from django.core.management import call_command

    from agentrunner.runner.pipeline import run_task
    from registry.models import Attempt, Task
    from registry.services import task_create
    from repopool.services import pool_warm, repository_create
    from tests.llm_server import LLMServer, tool

    def fixer(request):
        done = [m for m in request["messages"] if m["role"] == "tool"]
        if not done:
            return tool("edit_file", path="calc.py", old_text="a - b", new_text="a + b")
        return tool("finish", summary="add() now adds")

    server = LLMServer(delay=args.delay).start()
    server.responder = fixer
    settings.OPENAI_BASE_URL = server.base_url
    settings.OPENAI_API_KEY = "bench"
    settings.AGENTRUNNER_LLM_MODEL = "test-model"
    work = temp_dir("bench-runner-src-")
    repo = repository_create(
        name="sample", url=str(sample_repo(work / "sample")), pool_size=8,
        test_command=f"{sys.executable} -m pytest -q -p no:cacheprovider test_calc.py",
    )  # fmt: skip
    pool_warm(repository=repo)

    # (1) overhead per task, sequential
    for i in range(args.tasks + 1):
        task_create(title=f"t{i}", instructions="make add() add", repository=repo)
    run_task()  # warm-up, not counted
    overheads, phases = [], {}
    for _ in range(args.tasks):
        summary = run_task()
        assert summary.status == "succeeded", summary.message
        metrics = Attempt.objects.get(task_id=summary.task_id).metrics
        wall = summary.timings["total"]
        overheads.append(wall - metrics["llm"]["duration"] - metrics["test_seconds"])
        for name, seconds in metrics["phases"].items():
            phases.setdefault(name, []).append(seconds)
    print(f"runner overhead per task over {args.tasks} tasks (LLM delay {args.delay}s; wall - LLM - tests):")
    print(
        f"  median {median(overheads) * 1000:7.1f} ms   p95 {percentile(overheads, 0.95) * 1000:7.1f} ms   (target < 250 ms)"
    )
    print("  phase medians: " + ", ".join(f"{k} {median(v) * 1000:.1f} ms" for k, v in phases.items()))

    # (2) speedup of --concurrency with a slow model; a cheap test command keeps the two cores
    # from being the bottleneck, so the runner's own concurrency is what is measured.
    server.delay = args.speedup_delay
    Task.objects.all().update(status="succeeded")
    repo.test_command = "grep -q 'a + b' calc.py"
    repo.save()
    results = {}
    for concurrency in (1, 2, 4, 8):
        for i in range(args.speedup_tasks):
            task_create(title=f"c{concurrency}-{i}", instructions="make add() add", repository=repo)
        started = time.perf_counter()
        call_command(
            "runagent", "--loop", "--until-idle", "--quiet", "--concurrency", str(concurrency), stdout=io.StringIO()
        )
        results[concurrency] = time.perf_counter() - started
        assert (
            Task.objects.filter(title__startswith=f"c{concurrency}-", status="succeeded").count() == args.speedup_tasks
        )
    print(
        f"speedup on {args.speedup_tasks} tasks, 2 LLM calls each at {args.speedup_delay}s (runagent --loop --concurrency N):"
    )
    for concurrency, seconds in results.items():
        print(f"  concurrency {concurrency}: {seconds:6.1f} s   speedup {results[1] / seconds:4.1f}x")
    print("  (target: at least 6x at 8)")
    server.stop()


if __name__ == "__main__":
    main()
