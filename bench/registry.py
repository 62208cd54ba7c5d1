"""Registry and pool service benchmark on PostgreSQL, the API behind gunicorn with DEBUG off.

    python bench/registry.py [--clients 8] [--seconds 3] [--rounds 3] [--sizes 1000,100000,1000000]

Each figure is printed beside its floor measured in the same run, the compared operations
interleaved (A B A B ..., ``--rounds`` rounds), as the median over rounds with the p25–p75 spread:

- HTTP: the API under gunicorn as ``make serve`` runs it (gthread, 2 workers of 8 threads,
  persistent database connections), driven by wrk (a C client, as pgbench is: ``--clients``
  keep-alive connections, 2 threads) when it is installed, else by Python client threads:
  GET /api/health/, POST /api/tasks/, GET /api/tasks/<id>/events/ as the list (50 events) and in
  cursor pages (50 events; 100,000 events, first page and 90 % deep). Floor: pgbench -c 8 -j 2
  (TPC-B-like, and -S read-only) on a scratch database, and pgbench -C for the cost of a new
  connection. Latencies are each round's p50 and p99 (wrk's), their median over rounds printed.
- List pages at each of ``--sizes`` tasks (filled with one INSERT ... SELECT FROM generate_series,
  timed and printed): the first cursor page (``?cursor=``), a cursor page 90 % deep, and the
  first page-number page (``?page=1``, which counts every row), 50 tasks a page. Light cases run
  forward in even rounds and backward in odd ones; the counting pages last in each round. Every
  cursor page (tasks and events) also runs alone in each round: one connection, one request after
  the other, whose p50 is the page's own latency (with 8 clients on a saturated server the p50 is
  mostly the queue); the size ratios are printed both ways.
- Events: ``event_append_batch`` (batches of 100) and ``event_append`` (one at a time) in 8
  processes, each on a task of its own, called in-process (the user API has no event-writing
  endpoint). Floor: pgbench running the very statement the batch sends, 8 clients.
- Claims: ``task_claim`` in 1, 2, 4 and 8 processes over 20,000 queued tasks, in a table of the
  largest size, the counts in turn (1 2 4 8, then 8 4 2 1 in the next round). Floor: pgbench running the very statement ``task_claim`` sends (one CTE: pick with
  SKIP LOCKED, update, insert attempt and event), as many clients. Rates are claims made / time,
  counted in the table (a client that finds the queue empty does not count).
- Slots are measured by bench/pool.py.

Everything lives in scratch databases and a temp folder, dropped at exit. On a 2-core machine the
client competes with the server for the cores (wrk far less than Python threads), so the API
figures are a lower bound and the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlencode

from _setup import (
    django_in_tempdir,
    gunicorn,
    http_load,
    in_processes,
    median,
    percentile,
    pg_database,
    pgbench_path,
    small_repo,
    spread,
    wrk_load,
    wrk_path,
)

# The server as `make serve` runs it: gthread workers keep connections alive and hold a long poll
# in a thread; measured against sync workers on this 2-core box, they also serve more requests (see
# the README's Benchmarks section).
SERVE_WORKERS, SERVE_THREADS = 2, 8
SERVE_ARGS = ("-k", "gthread", "-w", str(SERVE_WORKERS), "--threads", str(SERVE_THREADS))


# --- pgbench --------------------------------------------------------------------------------------
class PgBench:
    def __init__(self, workdir: Path) -> None:
        self.binary = pgbench_path()
        if self.binary is None:
            raise SystemExit("pgbench not found (apt-get install postgresql-client): it is the floor of this bench")
        self.url = pg_database("pgbench")
        self.workdir = workdir
        self.run("-i", "-q", "-s", "10")

    def run(self, *args: str, url: str | None = None) -> str:
        done = subprocess.run([self.binary, *args, url or self.url], capture_output=True, text=True, cwd=self.workdir)
        if done.returncode:
            raise RuntimeError(f"pgbench {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def tps(self, *args: str) -> float:
        out = self.run(*args)
        return float(re.search(r"tps = ([\d.]+)", out).group(1))

    def connect_ms(self, clients: int, seconds: int) -> float:
        out = self.run("-C", "-S", "-c", str(clients), "-j", "2", "-T", str(seconds))
        return float(re.search(r"average connection time = ([\d.]+) ms", out).group(1))


# --- workers (forked processes, each with its own connection) ---------------------------------------
def _claim_worker(barrier, seconds: float, out) -> None:
    from registry.services import task_claim

    runner = f"bench-{uuid.uuid4().hex[:6]}"
    barrier.wait()
    stop = time.perf_counter() + seconds
    count = 0
    cpu = time.process_time()
    while time.perf_counter() < stop:
        if task_claim(runner_id=runner) is None:
            break
        count += 1
    out.put((count, time.process_time() - cpu))


def _event_worker(barrier, seconds: float, task_id: str, batch: int, out) -> None:
    from registry.services import event_append, event_append_batch

    barrier.wait()
    stop = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < stop:
        if batch == 1:
            event_append(task_id=task_id, type="progress", message=f"step {count}", data=_event_data(count))
        else:
            events = [
                {"type": "progress", "message": f"step {count + i}", "data": _event_data(count + i)}
                for i in range(batch)
            ]
            event_append_batch(task_id=task_id, events=events)
        count += batch
    out.put(count)


def _event_data(n: int) -> dict:
    return {"n": n, "tool": "write_file", "path": f"src/module_{n % 20}.py"}


def _django_url() -> str:
    """The bench's own scratch database (django_in_tempdir made it)."""
    import os

    return os.environ["DATABASE_URL"]


def pgbench_script(sql: str, params: dict, replace: dict[str, str] | None = None) -> str:
    """``sql`` with ``params`` bound client-side, as one pgbench command (one line)."""
    import psycopg

    with psycopg.connect(_django_url()) as conn:
        text = psycopg.ClientCursor(conn).mogrify(sql, params)
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    return " ".join(text.split()) + ";\n"


def fill_sql(repo, owner, total: int, offset: int) -> tuple[str, list]:
    """One INSERT ... SELECT FROM generate_series adding finished tasks, older than the rest, up to
    ``total`` rows (from ``offset``); its SQL and parameters."""
    from django.db import connection

    from registry.models import Task

    template = Task(title="", instructions="filled", repository=repo, owner=owner, status="succeeded")
    columns, values, params = [], [], []
    for field in Task._meta.concrete_fields:
        columns.append(field.column)
        if field.name == "id":
            values.append("gen_random_uuid()")
        elif field.name == "title":
            values.append("'filled ' || g")
        elif field.name in ("created_at", "updated_at", "finished_at"):
            values.append("now() - interval '1 day' - g * interval '1 millisecond'")
        else:
            values.append("%s")
            params.append(field.get_db_prep_save(getattr(template, field.attname), connection))
    sql = (
        f"INSERT INTO registry_task ({', '.join(columns)}) SELECT {', '.join(values)} "
        f"FROM generate_series({offset + 1}, {total}) g"
    )
    return sql, params


def run_sql(url: str, sql: str, params=None, *, fetch: bool = False):
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if fetch else None


def deep_cursor(url: str, fraction: float) -> str:
    """A cursor (as the API encodes one) at ``fraction`` of the way down the task list."""
    from datetime import UTC

    (count,) = run_sql(url, "SELECT count(*) FROM registry_task", fetch=True)[0]
    rows = run_sql(
        url,
        "SELECT created_at FROM registry_task ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1",
        [int(count * fraction)],
        fetch=True,
    )
    position = str(rows[0][0].astimezone(UTC))
    return base64.b64encode(urlencode({"p": position}).encode("ascii")).decode("ascii")


def event_cursor(after_seq: int) -> str:
    """A cursor (as the API encodes one) at the event after ``after_seq``."""
    return base64.b64encode(urlencode({"p": str(after_seq)}).encode("ascii")).decode("ascii")


def use_database(url: str) -> None:
    """Point this process (and the processes it forks, and pgbench) at another scratch database."""
    import os

    from django.db import connections

    connections.close_all()
    name = url.rsplit("/", 1)[1]
    connections["default"].settings_dict["NAME"] = name
    os.environ["DATABASE_URL"] = url


# --- gunicorn's worker models side by side ---------------------------------------------------------
WORKER_MODELS = {
    "sync -w 2": {"workers": 2},
    "sync -w 4": {"workers": 4},
    "gthread -w 2 --threads 8 (make serve)": {"workers": 2, "threads": 8},
    "gthread -w 4 --threads 2": {"workers": 4, "threads": 2},
}


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of its children still running (Linux /proc)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")

    def own(p: int) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick

    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return own(pid) + sum(own(child) for child in children)


def compare_workers(url: str, auth: dict, repository_id: int, *, rounds: int, seconds: float, clients: int) -> None:
    """GET /api/health/ and POST /api/tasks/ against each worker model, interleaved (the models in
    turn within a round), as requests a second and the server's CPU a request (its processes'
    user + system time over the run: the figure least moved by whatever else the machine does)."""
    import os

    from django.db import connection

    from registry.models import Task

    body = json.dumps({"title": "posted {n}", "instructions": "Make add() add.", "repository": repository_id})
    cases = {
        "GET /api/health/": ("GET", "/api/health/", None, 200),
        "POST /api/tasks/": ("POST", "/api/tasks/", body, 201),
    }
    found: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for model, options in WORKER_MODELS.items():
            servers[model] = stack.enter_context(gunicorn(env={"DATABASE_URL": url}, with_pid=True, **options))
        for port, _ in servers.values():  # warm-up
            for method, path, case_body, expect in cases.values():
                wrk_load(port, method, path, headers=auth, body=case_body, clients=clients, seconds=1, expect=expect)
        for round_number in range(rounds):
            order = list(servers) if round_number % 2 == 0 else list(servers)[::-1]
            for name, (method, path, case_body, expect) in cases.items():
                for model in order:
                    port, pid = servers[model]
                    before = _process_cpu_seconds(pid)
                    started = time.perf_counter()
                    rate, _, _ = wrk_load(
                        port,
                        method,
                        path,
                        headers=auth,
                        body=case_body,
                        clients=clients,
                        seconds=seconds,
                        expect=expect,
                    )
                    requests = rate * (time.perf_counter() - started)
                    found.setdefault((name, model), []).append((rate, (_process_cpu_seconds(pid) - before) / requests))
            Task.objects.filter(title__startswith="posted ").delete()
    connection.close()
    print(
        f"gunicorn worker models, wrk with {clients} keep-alive connections, {rounds} rounds (load {os.getloadavg()[0]:.1f}):"
    )
    for name in cases:
        for model in WORKER_MODELS:
            samples = found[(name, model)]
            print(
                f"  {name:18s} {model:40s} {spread([r for r, _ in samples]):>22s} req/s   "
                f"server CPU {median([c for _, c in samples]) * 1000:.2f} ms a request"
            )


# --- main -----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1000,100000,1000000", help="task counts for the list pages")
    parser.add_argument(
        "--only",
        default="http,events,claims",
        help="parts to run (comma-separated): http, events, claims; and workers (not by default): "
        "gunicorn's worker models side by side",
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    rounds, seconds, clients = args.rounds, args.seconds, args.clients
    sizes = [int(x) for x in args.sizes.split(",")]

    data = django_in_tempdir("bench-registry-")
    from django.contrib.auth import get_user_model
    from django.db import connection
    from rest_framework.authtoken.models import Token

    from registry import services
    from registry.models import Attempt, Task, TaskEvent
    from registry.services import event_append, task_create
    from repopool.services import repository_create

    # A small real repository for the tasks (bench/pool.py measures slots, on a large one).
    origin = small_repo(data / "origin")
    repo = repository_create(name="bench", url=str(origin), pool_size=16)
    staff = get_user_model().objects.create_user(username="bench", is_staff=True)
    auth = {"Authorization": f"Token {Token.objects.create(user=staff).key}", "Content-Type": "application/json"}
    events_task = task_create(title="events", instructions="x", repository=repo, owner=staff)
    for i in range(48):
        event_append(task_id=events_task.pk, type="note", message=f"step {i}", data={"i": i})
    for i in range(sizes[0] - Task.objects.count()):
        task_create(title=f"t{i}", instructions="fix it", repository=repo, owner=staff)
    # A task with a long log for the events pages (one INSERT ... SELECT, as the list fill).
    log_events = 100_000
    log_task = task_create(title="long log", instructions="x", repository=repo, owner=staff)
    run_sql(
        _django_url(),
        "INSERT INTO registry_taskevent (task_id, seq, type, message, data, created_at) "
        "SELECT %s, g, 'progress', 'step ' || g, jsonb_build_object('n', g, 'tool', 'write_file'), now() "
        "FROM generate_series(3, %s) g",
        [log_task.pk, log_events],
    )
    run_sql(_django_url(), "UPDATE registry_task SET event_seq = %s WHERE id = %s", [log_events, log_task.pk])
    Task.objects.update(status="succeeded")  # the claim bench queues its own
    run_sql(_django_url(), "VACUUM ANALYZE registry_task, registry_taskevent")
    pgb = PgBench(data)

    # One database per list size, copied from this one and filled (timed), each behind its own
    # server, so the sizes are measured side by side, interleaved, as everything else.
    base_url = _django_url()
    base_count = Task.objects.count()
    fill = fill_sql(repo, staff, max(sizes), base_count)
    connection.close()
    databases: dict[int, str] = {sizes[0]: base_url}
    fills: dict[int, float] = {}
    for size in sizes[1:]:
        databases[size] = pg_database(f"registry_{size}", template=base_url)
        started = time.perf_counter()
        run_sql(databases[size], fill[0].replace(f", {max(sizes)}) g", f", {size}) g"), fill[1])
        run_sql(databases[size], "VACUUM ANALYZE registry_task")
        fills[size] = time.perf_counter() - started

    if "workers" in parts:
        compare_workers(base_url, auth, repo.pk, rounds=rounds, seconds=seconds, clients=clients)

    if "http" in parts:
        post_body = json.dumps({"title": "posted {n}", "instructions": "Make add() add.", "repository": repo.pk})
        # name -> (method, path, body with {n}, expected status, heavy); heavy cases (a COUNT of the
        # whole table) run after the others in each round, so no light case always follows one.
        http_cases: dict[str, tuple[str, str, str | None, int, bool]] = {
            "GET /api/health/": ("GET", "/api/health/", None, 200, False),
            "POST /api/tasks/": ("POST", "/api/tasks/", post_body, 201, False),
            "GET /api/tasks/<id>/events/ (list, 50 events)": ("GET", f"/api/tasks/{events_task.pk}/events/", None, 200, False),
            "GET /api/tasks/<id>/events/?cursor= (50 events)": (
                "GET", f"/api/tasks/{events_task.pk}/events/?cursor=", None, 200, False,
            ),
            f"GET /api/tasks/<id>/events/?cursor= ({log_events:,} events)": (
                "GET", f"/api/tasks/{log_task.pk}/events/?cursor=", None, 200, False,
            ),
            f"GET /api/tasks/<id>/events/?cursor=<90 % deep> ({log_events:,} events)": (
                "GET", f"/api/tasks/{log_task.pk}/events/?cursor={quote(event_cursor(int(log_events * 0.9)), safe='')}",
                None, 200, False,
            ),
        }  # fmt: skip
        server_of = dict.fromkeys(http_cases, sizes[0])
        list_names: dict[int, list[str]] = {}
        for size in sizes:
            deep = quote(deep_cursor(databases[size], 0.9), safe="")
            cases = {
                f"GET /api/tasks/?cursor= ({size:,} tasks)": ("GET", "/api/tasks/?cursor=", None, 200, False),
                f"GET /api/tasks/?cursor=<90 % deep> ({size:,} tasks)": (
                    "GET",
                    f"/api/tasks/?cursor={deep}",
                    None,
                    200,
                    False,
                ),
                f"GET /api/tasks/?page=1 ({size:,} tasks, COUNT)": ("GET", "/api/tasks/?page=1", None, 200, True),
            }
            http_cases.update(cases)
            server_of.update(dict.fromkeys(cases, size))
            list_names[size] = list(cases)
        results: dict[str, list[tuple[float, float, float]]] = {}  # name -> per round (req/s, p50 s, p99 s)
        # A page's own latency, one connection sending one request after the other: under 8 clients
        # a saturated server's p50 is mostly the queue (clients / rate), which moves with the rest of
        # the machine; alone, it is what the page itself costs.
        paged = [name for name, case in http_cases.items() if "cursor=" in case[1]]
        alone: dict[str, list[tuple[float, float, float]]] = {}
        floors: dict[str, list[float]] = {"pgbench tpcb": [], "pgbench -S": [], "connect ms": []}

        def load(name: str, run_seconds: float, connections: int = clients) -> tuple[float, float, float]:
            method, path, body, expect, _ = http_cases[name]
            port = ports[server_of[name]]
            if use_wrk:
                return wrk_load(
                    port, method, path, headers=auth, body=body, clients=connections, seconds=run_seconds, expect=expect
                )

            def make(c: int, n: int):
                return method, path, None if body is None else body.replace("{n}", f"{c}-{n}").encode(), auth

            rate, latencies = http_load(port, make, clients=connections, seconds=run_seconds, expect=expect)
            return rate, percentile(latencies, 0.5), percentile(latencies, 0.99)

        def forget_posted() -> None:
            """Keep the first table at its size, its list index without the dead entries of the rows
            just deleted (autovacuum may be off, or late): the list pages compare sizes, not churn."""
            Task.objects.filter(title__startswith="posted ").delete()
            run_sql(base_url, "VACUUM ANALYZE registry_task, registry_taskevent")

        use_wrk = wrk_path() is not None
        light = [name for name, case in http_cases.items() if not case[4]]
        heavy = [name for name, case in http_cases.items() if case[4]]
        client = f"wrk ({clients} connections, 2 threads)" if use_wrk else f"{clients} Python client threads (no wrk)"
        print(
            f"API on PostgreSQL, gunicorn {' '.join(SERVE_ARGS)} (as make serve), DEBUG off, {client}, "
            f"{rounds} rounds of {max(1, round(seconds)) if use_wrk else seconds:g} s"
        )
        with contextlib.ExitStack() as servers:
            ports = {
                size: servers.enter_context(
                    gunicorn(workers=SERVE_WORKERS, threads=SERVE_THREADS, env={"DATABASE_URL": url})
                )
                for size, url in databases.items()
            }
            for name in http_cases:  # warm-up: imports, first connections, caches
                load(name, 1)
            forget_posted()
            for round_number in range(rounds):
                # Light cases forward in even rounds, backward in odd ones (A B .. B A), then the heavy.
                for name in (light if round_number % 2 == 0 else light[::-1]) + heavy:
                    results.setdefault(name, []).append(load(name, seconds))
                    if name.startswith("POST"):
                        forget_posted()
                for name in paged if round_number % 2 == 0 else paged[::-1]:
                    alone.setdefault(name, []).append(load(name, seconds, connections=1))
                floors["pgbench tpcb"].append(pgb.tps("-c", "8", "-j", "2", "-T", str(int(seconds))))
                floors["pgbench -S"].append(pgb.tps("-S", "-c", "8", "-j", "2", "-T", str(int(seconds))))
                floors["connect ms"].append(pgb.connect_ms(8, int(seconds)))

        def row(label: str, samples: list[tuple[float, float, float]], floor: float | None = None) -> str:
            rates = [rate for rate, _, _ in samples]
            ratio = f"  {median(rates) / floor:7.3f}" if floor else ""
            return (
                f"  {label:64s} {spread(rates):>22s} req/s   p50 {p50(label) * 1000:6.1f} ms"
                f"   p99 {median([p99 for _, _, p99 in samples]) * 1000:7.1f} ms{ratio}"
            )

        def p50(name: str) -> float:
            """The median over rounds of each round's p50."""
            return median([p for _, p, _ in results[name]])

        tpcb, read_only = median(floors["pgbench tpcb"]), median(floors["pgbench -S"])
        print(f"  floor: pgbench -c 8 -j 2 TPC-B-like {spread(floors['pgbench tpcb'], fmt='{:.0f}')} TPS;", end="")
        print(f" -S (read-only) {spread(floors['pgbench -S'], fmt='{:.0f}')} TPS;", end="")
        print(f" new connection (pgbench -C) {spread(floors['connect ms'])} ms")
        print(f"  {'':64s} {'median (p25–p75)':>22s}           (medians over rounds)        / pgbench")
        for name in http_cases:
            print(row(name, results[name], tpcb if name.startswith("POST") else read_only))
        post_rates = [rate for rate, _, _ in results["POST /api/tasks/"]]
        print(
            f"  POST /api/tasks/ against TPC-B: {median(post_rates) / tpcb:.3f} (per round: "
            + ", ".join(f"{r / t:.3f}" for r, t in zip(post_rates, floors["pgbench tpcb"], strict=True))
            + ")"
        )
        print("  fill (INSERT ... SELECT generate_series + VACUUM ANALYZE, on a copy of the first): ", end="")
        print(", ".join(f"to {size:,} in {fills[size]:.1f} s" for size in sizes[1:]))

        def alone_p50(name: str) -> float:
            return median([p for _, p, _ in alone[name]])

        print(f"  one connection, one request at a time ({rounds} rounds of {max(1, round(seconds))} s):")
        for name in paged:
            samples = [p * 1000 for _, p, _ in alone[name]]
            print(
                f"  {name:64s} p50 {spread(samples, fmt='{:.2f}'):>22s} ms   p99 {median([q * 1000 for _, _, q in alone[name]]):6.2f} ms"
            )
        few_events = "GET /api/tasks/<id>/events/?cursor= (50 events)"
        many_events = f"GET /api/tasks/<id>/events/?cursor= ({log_events:,} events)"
        deep_events = f"GET /api/tasks/<id>/events/?cursor=<90 % deep> ({log_events:,} events)"
        for latency, source in (("alone", alone_p50), (f"{clients} connections", p50)):
            for i, label in enumerate(["first cursor page", "cursor page 90 % deep", "page=1 with COUNT"]):
                if source is alone_p50 and i == 2:
                    continue  # the counting pages are not run alone
                base = source(list_names[sizes[0]][i])
                ratios = ", ".join(f"{size:,}: {source(list_names[size][i]) / base:.2f}x" for size in sizes[1:])
                print(f"  list p50 ({latency}) against {sizes[0]:,} tasks, {label}: {ratios}")
            print(
                f"  events page p50 ({latency}) against 50 events: first page at {log_events:,} events "
                f"{source(many_events) / source(few_events):.2f}x, 90 % deep {source(deep_events) / source(few_events):.2f}x"
            )

    # Events and claims in the largest table.
    use_database(databases[max(sizes)])

    if "events" in parts:
        # --- events -----------------------------------------------------------------------------------
        writers = 8
        event_tasks = [
            task_create(title=f"ev-{i}", instructions="x", repository=repo, owner=staff) for i in range(writers)
        ]
        sample = [{"type": "progress", "message": f"step {i}", "data": _event_data(i)} for i in range(100)]
        rows = [(e["type"], e["message"], e["data"]) for e in sample]
        params = {
            "n": 100,
            "task_id": event_tasks[0].pk,
            "now": services.timezone.now(),
            "types": [r[0] for r in rows],
            "messages": [r[1] for r in rows],
            "datas": [json.dumps(r[2]) for r in rows],
        }
        script = pgbench_script(
            services._APPEND_SQL,
            params,
            {f"'{event_tasks[0].pk}'::uuid": "(SELECT id FROM registry_task WHERE title = 'ev-' || :client_id)"},
        )
        (data / "events.sql").write_text(script)
        event_rates: dict[str, list[float]] = {"batch": [], "single": [], "floor": []}
        each = [(str(t.pk),) for t in event_tasks]
        for _ in range(rounds):
            elapsed, counts = in_processes(_event_worker, writers, seconds, each=[(*e, 100) for e in each])
            event_rates["batch"].append(sum(counts) / elapsed)
            out = pgb.run(
                "-n", "-f", "events.sql", "-c", str(writers), "-j", "2", "-T", str(int(seconds)), url=_django_url()
            )
            event_rates["floor"].append(100 * float(re.search(r"tps = ([\d.]+)", out).group(1)))
            elapsed, counts = in_processes(_event_worker, writers, seconds, each=[(*e, 1) for e in each])
            event_rates["single"].append(sum(counts) / elapsed)
        print(f"events, {writers} processes each on its own task, in-process service calls, {rounds} rounds:")
        print(
            f"  event_append_batch (100 a call) {spread(event_rates['batch'], fmt='{:.0f}')} events/s   "
            f"floor (its statement in pgbench, {writers} clients) {spread(event_rates['floor'], fmt='{:.0f}')} events/s"
            f"   ratio {median(event_rates['batch']) / median(event_rates['floor']):.3f}"
        )
        print(f"  event_append (one a call)       {spread(event_rates['single'], fmt='{:.0f}')} events/s")

    if "claims" in parts:
        # --- claims -----------------------------------------------------------------------------------
        queued = 20_000
        Task.objects.bulk_create(
            Task(title=f"q{i}", instructions="x", repository=repo, status="queued") for i in range(queued)
        )
        queued_ids = list(Task.objects.filter(status="queued").values_list("pk", flat=True))
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE registry_task")

        def requeue() -> None:
            Attempt.objects.filter(task_id__in=queued_ids).delete()
            TaskEvent.objects.filter(task_id__in=queued_ids).delete()
            Task.objects.filter(pk__in=queued_ids).update(
                status="queued", attempts_count=0, started_at=None, event_seq=0
            )
            with connection.cursor() as cursor:
                cursor.execute("VACUUM registry_task, registry_attempt, registry_taskevent")

        def claimed() -> int:
            return Task.objects.filter(pk__in=queued_ids, status="running").count()

        claim_sql = pgbench_script(services._claim_sql(named=False), services._claim_params("pgbench", None))
        (data / "claim.sql").write_text(claim_sql)
        counts_n = (1, 2, 4, 8)
        claims: dict[int, list[float]] = {n: [] for n in counts_n}
        claim_floor: dict[int, list[float]] = {n: [] for n in counts_n}
        claim_cpu: dict[int, list[float]] = {n: [] for n in counts_n}  # the claimers' own CPU a claim
        for round_number in range(rounds):
            # 1 2 4 8 in even rounds, 8 4 2 1 in odd ones: a drift of the machine (other work, the
            # disk's flush time) over a round weighs on every claimer count alike.
            for n in counts_n if round_number % 2 == 0 else counts_n[::-1]:
                requeue()
                elapsed, done = in_processes(_claim_worker, n, seconds)
                counts = [count for count, _ in done]
                claim_cpu[n].append(sum(cpu for _, cpu in done) / max(1, sum(counts)))
                if sum(counts) >= queued:
                    print(f"  (warning: {n} claimers emptied the queue; raise the queue size)")
                claims[n].append(sum(counts) / elapsed)
                requeue()
                pgb.run(
                    "-n",
                    "-f",
                    "claim.sql",
                    "-c",
                    str(n),
                    "-j",
                    str(min(n, 2)),
                    "-T",
                    str(int(seconds)),
                    url=_django_url(),
                )
                claim_floor[n].append(claimed() / int(seconds))
        print(
            f"claims (task_claim in N processes, {queued:,} queued among {Task.objects.count():,} tasks), "
            f"{rounds} rounds of {seconds:g} s:"
        )
        for n in counts_n:
            ratio = median(claims[n]) / median(claim_floor[n])
            print(
                f"  {n} claimer(s): {spread(claims[n], fmt='{:.0f}')} claims/s   floor (its statement in pgbench, {n} "
                f"clients) {spread(claim_floor[n], fmt='{:.0f}')} claims/s   ratio {ratio:.3f}   "
                f"claimer CPU {median(claim_cpu[n]) * 1e6:.0f} µs a claim"
            )


if __name__ == "__main__":
    main()
