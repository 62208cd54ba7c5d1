"""Run inspector benchmark: server time of the pages with 50,000 tasks and a 5,000-step transcript.

    python bench/inspector.py [--tasks 50000] [--steps 5000] [--runs 9] [--database postgres|sqlite]

Fills a scratch database of its own (PostgreSQL, dropped at exit; or SQLite in a temp folder) with tasks of every status over 14 days, an attempt with phase metrics
each, and one task with a 5,000-step transcript, a 2,000-line patch and 10,000 events. Then times
each page in-process through Django's test client (server time: URL routing, queries, templates;
no network) and prints medians and worst times with the query counts. Targets: the list under
300 ms, a run page under 500 ms.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from datetime import timedelta
from decimal import Decimal

from _setup import django_in_tempdir, median

STATUSES = ["succeeded"] * 6 + ["failed"] * 2 + ["cancelled", "queued", "running", "pending"]
REASONS = ["tests_failed", "llm_error", "timeout", "implementation_failed", "budget_exceeded"]


def transcript(steps: int) -> bytes:
    out = io.StringIO()
    for n in range(1, steps + 1):
        tool_message = {"role": "tool", "tool_call_id": f"c{n - 1}", "content": "    1| line\n" * 30}
        out.write(json.dumps({"type": "request", "model": "gpt-4o-mini", "messages": [tool_message]}) + "\n")
        args = json.dumps({"path": f"src/module_{n % 97}.py"})
        call = {"id": f"c{n}", "type": "function", "function": {"name": "read_file", "arguments": args}}
        message = {"role": "assistant", "content": f"Looking at module {n % 97}.", "tool_calls": [call]}
        response = {"type": "response", "model": "gpt-4o-mini", "message": message, "prompt_tokens": 1000 + n}
        response.update(completion_tokens=60, duration=0.8, cost_usd="0.0002", attempts=1)
        out.write(json.dumps(response) + "\n")
        result = "\n".join(f"{i:5}| code line {i}" for i in range(1, 200))
        out.write(
            json.dumps({"type": "tool_call", "name": "read_file", "arguments": args, "ok": True, "result": result})
            + "\n"
        )
    return out.getvalue().encode()


def patch(files: int, lines: int) -> bytes:
    out = []
    for f in range(files):
        out.append(
            f"diff --git a/src/m{f}.py b/src/m{f}.py\n--- a/src/m{f}.py\n+++ b/src/m{f}.py\n@@ -1,{lines} +1,{lines} @@\n"
        )
        for i in range(lines):
            out.append(
                f"-    value_{i} = compute({i})  # old\n+    value_{i} = compute({i}) + 1  # new\n"
                if i % 3 == 0
                else f"     keep_{i} = {i}\n"
            )
    return "".join(out).encode()


def fill(tasks: int, steps: int) -> str:
    from django.contrib.auth import get_user_model
    from django.db import connection

    from artifacts.services import artifact_store
    from registry.models import Attempt, Task, TaskEvent
    from registry.services import task_link_artifact
    from repopool.models import Repository

    rng = random.Random(7)
    User = get_user_model()
    User.objects.create_user("bench-staff", password="x", is_staff=True)
    alice = User.objects.create_user("bench-alice", password="x")
    repos = [Repository.objects.create(name=f"repo-{i}", url=f"/nowhere/{i}") for i in range(8)]
    started = time.monotonic()
    batch = []
    for i in range(tasks):
        status = rng.choice(STATUSES)
        batch.append(
            Task(
                title=f"Task {i}: fix module {i % 97}",
                instructions="Fix it.",
                repository=rng.choice(repos),
                owner=alice if i % 2 else None,
                status=status,
                failure_reason=rng.choice(REASONS)
                if status == "failed"
                else ("cancelled" if status == "cancelled" else ""),
                attempts_count=1 if status not in ("queued", "pending") else 0,
                prompt_tokens=rng.randint(1000, 90000),
                completion_tokens=rng.randint(100, 9000),
                cost_usd=Decimal(rng.randint(1, 90000)) / Decimal(1_000_000),
                llm_model=rng.choice(["", "gpt-4o", "gpt-4o-mini"]),
            )
        )
        if len(batch) == 5000:
            Task.objects.bulk_create(batch)
            batch = []
    Task.objects.bulk_create(batch)
    # Spread them over 14 days (bulk_create stamps "now"), with start and finish times to match.
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "UPDATE registry_task SET created_at = now() - random() * interval '14 days';"
                "UPDATE registry_task SET queued_at = created_at, started_at = created_at + interval '5 seconds';"
                "UPDATE registry_task SET finished_at = started_at + random() * interval '20 minutes' "
                "WHERE status IN ('succeeded', 'failed', 'cancelled')"
            )
        else:
            cursor.execute(
                "UPDATE registry_task SET created_at = datetime('now', '-' || (abs(random()) % 1209600) || ' seconds')"
            )
            cursor.execute("UPDATE registry_task SET queued_at = created_at, started_at = created_at")
            cursor.execute(
                "UPDATE registry_task SET finished_at = datetime(started_at, '+' || (abs(random()) % 1200) || ' seconds') "
                "WHERE status IN ('succeeded', 'failed', 'cancelled')"
            )
    attempts = []
    for task_id, status in (
        Task.objects.exclude(status__in=["queued", "pending"]).values_list("pk", "status").iterator()
    ):
        phases = {
            p: round(rng.uniform(0.01, 30), 3)
            for p in ("claim", "allocate", "prepare", "agent", "tests", "commit", "artifacts")
        }
        attempts.append(
            Attempt(
                task_id=task_id,
                number=1,
                runner_id="bench",
                outcome="running" if status == "running" else status,
                metrics={
                    "phases": phases,
                    "total_seconds": sum(phases.values()),
                    "llm": {"duration": phases["agent"] * 0.7, "calls": 12},
                },
            )
        )
        if len(attempts) == 5000:
            Attempt.objects.bulk_create(attempts)
            attempts = []
    Attempt.objects.bulk_create(attempts)
    Attempt.objects.exclude(outcome="running").update(finished_at=time_now())

    big = Task.objects.filter(status="succeeded", owner=alice).first()
    Task.objects.filter(pk=big.pk).update(event_seq=2 * steps)
    events = [
        TaskEvent(
            task_id=big.pk,
            seq=n,
            type="llm_call" if n % 2 else "tool_call",
            message=f"step {n // 2}",
            data={"step": n // 2},
        )
        for n in range(1, 2 * steps + 1)
    ]
    TaskEvent.objects.bulk_create(events, batch_size=5000)
    for kind, content, name in (
        ("transcript", transcript(steps), "transcript-attempt1.jsonl"),
        ("patch", patch(20, 100), "big.patch"),
        ("test_report", ("ok\n" * 3000 + "FAILED test_x.py::test_y\n").encode(), "tests-attempt1.log"),
    ):
        artifact = artifact_store(source=content, name=name, kind=kind, owner=alice)
        task_link_artifact(task_id=big.pk, artifact_id=artifact.pk, role=kind, attempt_number=1)
    print(f"filled {tasks:,} tasks, their attempts and one {steps:,}-step run in {time.monotonic() - started:.1f}s")
    return str(big.pk)


def time_now():
    from django.utils import timezone

    return timezone.now() - timedelta(minutes=1)


def measure(client, url: str, runs: int) -> tuple[float, float, int, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get(url)  # warm: template compilation, connection
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = client.get(url)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, (url, response.status_code)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    return median(times), max(times), len(queries), len(response.content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    args = parser.parse_args()
    django_in_tempdir("bench-inspector-", database=args.database)
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client

    settings.ALLOWED_HOSTS = ["*"]
    big = fill(args.tasks, args.steps)
    print(f"database: {connection.vendor}; medians and worst of {args.runs} requests (server time, in-process)")
    staff, plain = Client(), Client()
    staff.force_login(get_user_model().objects.get(username="bench-staff"))
    plain.force_login(get_user_model().objects.get(username="bench-alice"))
    cases = [
        ("list, staff, all 50k", staff, "/runs/", 0.300),
        ("list, plain user (own)", plain, "/runs/", 0.300),
        ("list, failed + reason", staff, "/runs/?status=failed&reason=tests_failed", 0.300),
        ("list, text search", staff, "/runs/?q=module+42", 0.300),
        ("list, page 500", staff, "/runs/?page=500", 0.300),
        ("list rows (live poll)", staff, "/runs/?status=running&fragment=rows", 0.300),
        (f"run page, {args.steps:,} steps, p.1", plain, f"/runs/{big}/", 0.500),
        ("run page, last steps page", plain, f"/runs/{big}/?tpage={-(-args.steps // 50)}", 0.500),
        ("events after (poll)", plain, f"/runs/{big}/events/?after={2 * args.steps - 5}", 0.100),
        ("dashboard, staff", staff, "/runs/dashboard/", None),
        ("/metrics", staff, "/metrics", None),
    ]
    print(f"{'page':34} {'median':>9} {'worst':>9} {'queries':>8} {'KiB':>7}  target")
    for label, client, url, target in cases:
        med, worst, queries, size = measure(client, url, args.runs)
        verdict = "" if target is None else (f"< {target * 1000:.0f} ms " + ("ok" if med < target else "MISSED"))
        print(f"{label:34} {med * 1000:7.1f}ms {worst * 1000:7.1f}ms {queries:8d} {size / 1024:7.1f}  {verdict}")


if __name__ == "__main__":
    main()
