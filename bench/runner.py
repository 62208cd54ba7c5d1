"""Runner benchmark against the local OpenAI-compatible test server with a fixed response delay.

The repository is real source: Django's own files (about 3,600) plus a small module with a bug
and its test; PostgreSQL in a scratch database, DEBUG off.

    python bench/runner.py [--tasks 20] [--delay 0.05] [--speedup-delay 1.0] [--speedup-tasks 16]
                           [--rounds 8] [--claim-tasks 320] [--claimers 16]

Prints (1) the runner's own overhead per task, wall time (from the claim to the attempt's end)
minus LLM time minus test time, median and p95, with the time per phase and the git processes each
phase starts; (2) the speedup of `runagent --loop --concurrency 1, 2, 4, 8`
on `--speedup-tasks` tasks whose LLM answers take `--speedup-delay` seconds each; (3) the same
overhead in both modes side by side, in-process ports and HTTP ports against the API under
gunicorn, interleaved (local, http, http, local, ...) for `--rounds` rounds; (4) the claim rate of
`--claimers` remote runners (threads, each its own HTTP client and token) over `--claim-tasks`
queued tasks, beside the same number of in-process claimers.
Targets: overhead under 250 ms per task; speedup at 8 at least 6x; HTTP overhead under 1.5x the
in-process overhead and under 400 ms a task.

Every task takes the path users take: the default branch, fetched from origin on every allocation
(REPO_POOL_FETCH_TTL=0 here: a real queue's tasks are rarely seconds apart), a result commit pushed
(in-process) or sent as a bundle (HTTP), four artifacts stored and linked, the slot reset.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import sys
import threading
import time
from pathlib import Path

from _setup import ROOT, build_django_repo, django_in_tempdir, gunicorn, median, percentile, spread, temp_dir


def sample_repo(where: Path) -> Path:
    """Django's own source (thousands of files) plus a small module with a bug and its test."""
    where.mkdir(parents=True)
    (where / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (where / "test_calc.py").write_text("from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    build_django_repo(where)
    return where


class GitCounter:
    """Counts the git processes of this process's runs and their time, by the run's phase.

    Every git command of a working copy goes through ``workcopy.git._run``; the phase is the one
    ``TaskRun.phase`` is in (``-`` between phases: the change check before the tests), or for the
    run's background threads the step they serve: the result leaving the host (commit) and the
    slot's reset (release), each overlapping the phases after it."""

    # The reset's file clean runs in a thread of the reset's own ("git-clean"), beside its prune.
    BACKGROUND = (("publish", "commit*"), ("reset-slot", "release*"), ("git-clean", "release*"))

    def __init__(self) -> None:
        self.phase = threading.local()
        self.runs: list[tuple[str, str, float]] = []
        self._lock = threading.Lock()

    def install(self) -> None:
        from agentrunner.runner import pipeline
        from workcopy import git

        counter, real_run, real_phase = self, git._run, pipeline.TaskRun.phase

        def counted_run(args, **kwargs):
            started = time.perf_counter()
            try:
                return real_run(args, **kwargs)
            finally:
                with counter._lock:
                    counter.runs.append((counter.current(), git._verb(args), time.perf_counter() - started))

        def phase(run, name):
            inner = real_phase(run, name)

            class Named:
                def __enter__(self):
                    counter.phase.name = name
                    return inner.__enter__()

                def __exit__(self, *exc):
                    counter.phase.name = "-"
                    return inner.__exit__(*exc)

            return Named()

        git._run = counted_run
        pipeline.TaskRun.phase = phase

    def current(self) -> str:
        thread = threading.current_thread().name
        for prefix, phase in self.BACKGROUND:
            if thread.startswith(prefix):
                return phase
        return getattr(self.phase, "name", "-")

    def take(self) -> list[tuple[str, str, float]]:
        with self._lock:
            taken, self.runs = self.runs, []
        return taken

    @staticmethod
    def report(runs: list[tuple[str, str, float]], tasks: int, indent: str = "  ") -> None:
        by_phase: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, collections.Counter()])
        for phase, verb, seconds in runs:
            entry = by_phase[phase]
            entry[0] += 1
            entry[1] += seconds
            entry[2][verb] += 1
        total = sum(seconds for _, _, seconds in runs)
        print(
            f"{indent}git: {len(runs) / tasks:.1f} processes, {total / tasks * 1000:.0f} ms a task; by phase "
            "(* in a thread of its own, beside the phases after it):"
        )
        for phase, (n, seconds, verbs) in sorted(by_phase.items(), key=lambda kv: -kv[1][1]):
            listed = ", ".join(f"{verb} {count / tasks:g}" for verb, count in verbs.most_common())
            print(f"{indent}  {phase:9s} {n / tasks:4.1f} processes {seconds / tasks * 1000:6.1f} ms ({listed})")


git_counter = GitCounter()


def phase_report(phases: dict[str, list[float]], overheads: list[float], llm: list[float], tests: list[float]) -> str:
    """Phase medians in ms (the agent's without its LLM time, the tests' without the test command's),
    and what no phase holds (the change check, the finish, ...)."""
    named = dict(phases)
    if "agent" in named:
        named["agent - LLM"] = [a - b for a, b in zip(named.pop("agent"), llm, strict=False)]
    if "tests" in named:
        named["tests - command"] = [a - b for a, b in zip(named.pop("tests"), tests, strict=False)]
    shown = ", ".join(f"{k} {median(v) * 1000:.0f}" for k, v in named.items())
    rest = [o - sum(v[i] for v in named.values() if i < len(v)) for i, o in enumerate(overheads)]
    return f"{shown}, outside any phase {median(rest) * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--speedup-delay", type=float, default=1.0)
    parser.add_argument("--speedup-tasks", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the two modes")
    parser.add_argument("--claim-tasks", type=int, default=320)
    parser.add_argument("--claimers", type=int, default=16)
    parser.add_argument("--claim-rounds", type=int, default=3)
    parser.add_argument("--only-modes", action="store_true", help="only (3) and (4)")
    parser.add_argument("--skip-speedup", action="store_true", help="leave out (2)")
    parser.add_argument("--skip-claims", action="store_true", help="leave out (4)")
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
    settings.REPO_POOL_FETCH_TTL = 0  # every allocation fetches the branch, as when tasks are not back to back
    git_counter.install()
    work = temp_dir("bench-runner-src-")
    repo = repository_create(
        name="sample", url=str(sample_repo(work / "sample")), pool_size=8,
        test_command=f"{sys.executable} -m pytest -q -p no:cacheprovider test_calc.py",
    )  # fmt: skip
    pool_warm(repository=repo)
    if not args.only_modes:
        overhead_and_speedup(args, server, repo, run_task, Attempt, Task, task_create, call_command)
    server.delay = args.delay
    repo.test_command = f"{sys.executable} -m pytest -q -p no:cacheprovider test_calc.py"
    repo.save()
    both_modes(args, server, repo)
    server.stop()


def overhead_and_speedup(args, server, repo, run_task, Attempt, Task, task_create, call_command) -> None:
    # (1) overhead per task, sequential
    # Warm-up, not counted: one task on every slot (the pool hands out its least-used slot, so
    # sequential tasks go round all of them). What is measured is a running runner's steady state:
    # the first task a process runs on a slot also reads every folder for its repository map.
    for i in range(args.tasks + repo.pool_size):
        task_create(title=f"t{i}", instructions="make add() add", repository=repo)
    for _ in range(repo.pool_size):
        run_task()
    git_counter.take()
    overheads, phases, llm, tests = [], {}, [], []
    for _ in range(args.tasks):
        summary = run_task()
        assert summary.status == "succeeded", summary.message
        metrics = Attempt.objects.get(task_id=summary.task_id).metrics
        overheads.append(_overhead(summary, metrics))
        llm.append(metrics["llm"]["duration"])
        tests.append(metrics["test_seconds"])
        for name, seconds in metrics["phases"].items():
            phases.setdefault(name, []).append(seconds)
    print(
        f"runner overhead per task over {args.tasks} tasks (LLM delay {args.delay}s; wall from the claim - LLM - tests):"
    )
    print(
        f"  p50 {median(overheads) * 1000:7.1f} ms   p95 {percentile(overheads, 0.95) * 1000:7.1f} ms   (target: p95 < 250 ms)"
    )
    print("  each task in run order, ms: " + " ".join(f"{o * 1000:.0f}" for o in overheads))
    print("  phase medians, ms: " + phase_report(phases, overheads, llm, tests))
    GitCounter.report(git_counter.take(), args.tasks)
    if args.skip_speedup:
        Task.objects.all().update(status="succeeded")
        return

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
    Task.objects.all().update(status="succeeded")


def _overhead(summary, metrics) -> float:
    """Wall time from the claim to the attempt's end (the summary's total starts after the claim),
    minus the time the LLM and the test commands took."""
    wall = summary.timings["total"] + summary.timings.get("claim", 0.0)
    return wall - metrics["llm"]["duration"] - metrics["test_seconds"]


def both_modes(args, server, repo) -> None:
    """(3) per-task overhead, in-process vs HTTP, interleaved; (4) the claim rate of remote runners."""
    from agentrunner.runner import http
    from agentrunner.runner.pipeline import run_task
    from agentrunner.runner.ports import Ports
    from registry.models import Attempt, Task
    from registry.services import task_claim, task_create
    from runners.services import runner_token_create

    Task.objects.exclude(status__in=("succeeded", "failed", "cancelled")).update(status="succeeded")
    _token, raw = runner_token_create(name="bench-remote")
    remote_pool = temp_dir("bench-runner-remote-pool-")
    # As `make serve`: 2 gthread workers of 8 threads (a long poll holds a thread, not a worker); a
    # second server with the former 2 sync workers for the claim rate beside it.
    with gunicorn(workers=2, threads=8) as port, gunicorn(workers=2) as sync_port:
        base = f"http://127.0.0.1:{port}"
        config = http.ApiConfig(
            registry_url=http.api_root(base), pool_url=http.api_root(base), artifacts_url=http.api_root(base),
            token=raw, host="bench-remote",
        )  # fmt: skip
        http.announce_host(config, capacity={repo.name: 2})

        def remote_ports() -> Ports:
            return http.ports(config, pool_root=remote_pool)

        phases: dict[str, dict[str, list[float]]] = {"local": {}, "http": {}}
        llm: dict[str, list[float]] = {"local": [], "http": []}
        tests: dict[str, list[float]] = {"local": [], "http": []}
        gits: dict[str, list] = {"local": [], "http": []}

        def one(mode: str) -> float:
            task = task_create(title=f"{mode}", instructions="make add() add", repository=repo)
            ports = Ports.local() if mode == "local" else remote_ports()
            git_counter.take()
            summary = run_task(task_id=task.pk, ports=ports)
            gits[mode] += git_counter.take()
            assert summary.status == "succeeded", (mode, summary.message)
            metrics = Attempt.objects.get(task_id=summary.task_id).metrics
            for name, seconds in metrics["phases"].items():
                phases[mode].setdefault(name, []).append(seconds)
            llm[mode].append(metrics["llm"]["duration"])
            tests[mode].append(metrics["test_seconds"])
            return _overhead(summary, metrics)

        # Warm-up, not counted: one task on every slot of each mode (see (1)).
        for _ in range(repo.pool_size):
            one("local")
        for _ in range(2):  # the runner host's capacity
            one("http")
        phases = {"local": {}, "http": {}}
        llm, tests, gits = {"local": [], "http": []}, {"local": [], "http": []}, {"local": [], "http": []}
        samples: dict[str, list[float]] = {"local": [], "http": []}
        for n in range(args.rounds):
            for mode in ("local", "http") if n % 2 == 0 else ("http", "local"):
                samples[mode].append(one(mode))
        local, remote = median(samples["local"]), median(samples["http"])
        print(
            f"overhead per task, both modes side by side ({args.rounds} interleaved rounds, LLM delay {args.delay}s; "
            "wall from the claim - LLM - tests), ms:"
        )
        for mode, label in (
            ("local", "in-process ports"),
            ("http", "HTTP ports (gunicorn -k gthread -w 2 --threads 8)"),
        ):
            values = samples[mode]
            print(
                f"  {label}: p50 {median(values) * 1000:.0f}, p95 {percentile(values, 0.95) * 1000:.0f} "
                f"(p25-p75 {percentile(values, 0.25) * 1000:.0f}-{percentile(values, 0.75) * 1000:.0f})"
            )
        print(
            f"  ratio HTTP / in-process: p50 {remote / local:.2f}x, p95 "
            f"{percentile(samples['http'], 0.95) / percentile(samples['local'], 0.95):.2f}x   (targets: < 1.5x and < 400 ms)"
        )
        for mode in ("local", "http"):
            print(f"  {mode} phase medians, ms: " + phase_report(phases[mode], samples[mode], llm[mode], tests[mode]))
            GitCounter.report(gits[mode], args.rounds, indent="    ")
        if args.skip_claims:
            return

        # (4) the claim rate: N remote runners claiming as fast as they can, beside N in-process ones.
        def claim_round(mode: str) -> float:
            for i in range(args.claim_tasks):
                task_create(title=f"claim-{mode}-{i}", instructions="x", repository=repo)
            barrier = threading.Barrier(args.claimers + 1)
            counts = [0] * args.claimers

            def claimer(index: int) -> None:
                from django.db import connection

                api = None
                if mode == "http":
                    api = http.ApiClient(config)
                elif mode == "http-sync":
                    sync_root = http.api_root(f"http://127.0.0.1:{sync_port}")
                    api = http.ApiClient(dataclasses.replace(config, registry_url=sync_root))
                registry = http.HttpRegistry(api, api.config.registry_url) if api else None
                barrier.wait()
                try:
                    while True:
                        if registry is not None:
                            got = registry.claim(runner_id=f"bench-{index}", wait=0)
                        else:
                            got = task_claim(runner_id=f"bench-{index}", task_id=None)
                        if got is None:
                            return
                        counts[index] += 1
                finally:
                    if api is not None:
                        api.close()
                    connection.close()

            threads = [threading.Thread(target=claimer, args=(i,)) for i in range(args.claimers)]
            for thread in threads:
                thread.start()
            barrier.wait()
            started = time.perf_counter()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            assert sum(counts) == args.claim_tasks, (mode, sum(counts))
            Task.objects.filter(status="running").update(status="succeeded")
            return sum(counts) / elapsed

        rates: dict[str, list[float]] = {"local": [], "http": [], "http-sync": []}
        order = ("http", "local", "http-sync")
        for n in range(args.claim_rounds):
            for mode in order if n % 2 == 0 else order[::-1]:
                rates[mode].append(claim_round(mode))
        print(
            f"claims per second, {args.claimers} claimers over {args.claim_tasks} queued tasks "
            f"({args.claim_rounds} interleaved rounds each):"
        )
        print(f"  remote runners, gthread 2x8 (POST /api/runner/v1/claim/): {spread(rates['http'])}")
        print(f"  remote runners, sync -w 2: {spread(rates['http-sync'])}")
        print(f"  in-process (task_claim): {spread(rates['local'])}")
        print(f"  ratio remote (gthread) / in-process: {median(rates['http']) / median(rates['local']):.2f}")


if __name__ == "__main__":
    main()
