"""Registry and pool service benchmark on PostgreSQL, the API behind gunicorn with DEBUG off.

    python bench/registry.py [--clients 8] [--seconds 3] [--rounds 3] [--big 50000]

Each figure is printed beside its floor measured in the same run, the compared operations
interleaved (A B A B ..., ``--rounds`` rounds), as the median over rounds with the p25–p75 spread:

- HTTP (``--clients`` keep-alive client threads against gunicorn -w 4): GET /api/health/,
  POST /api/tasks/, GET /api/tasks/<id>/events/ (50 events), GET /api/tasks/ at 1,000 and at
  ``--big`` tasks, each on two servers side by side: persistent connections off
  (DJANGO_CONN_MAX_AGE=0) and on (60). Floor: pgbench -c 8 -j 2 (TPC-B-like, and -S read-only)
  on a scratch database, and pgbench -C for the cost of a new connection.
- Claims: ``task_claim`` in 1 and 8 processes over 5,000 queued tasks. Floor: pgbench running the
  same shape of SQL (SELECT ... FOR UPDATE SKIP LOCKED, conditional UPDATE, two INSERTs) in 1 and 8
  clients.
- Slots: ``slot_allocate`` (default branch, fetch as the runner does) + ``slot_release`` in 16
  processes over 16 slots of a small repository. Floor: 16 processes each running the git work
  alone (reset --hard + clean -ffdx) on its own clone.

Everything lives in scratch databases and a temp folder, dropped at exit. The client is Python
threads (wrk is not needed); on a 2-core machine it competes with the server, so the API figures
are a lower bound and the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import subprocess
import time
import uuid
from pathlib import Path

from _setup import (
    GIT_ENV,
    django_in_tempdir,
    git,
    gunicorn,
    http_load,
    median,
    percentile,
    pg_database,
    pgbench_path,
    spread,
)

CLAIM_SQL = """\
\\set pri random(0, 3)
BEGIN;
SELECT id FROM bq WHERE status = 'queued' ORDER BY priority DESC, created_at LIMIT 1 FOR UPDATE SKIP LOCKED \\gset
UPDATE bq SET status = 'running', attempts = attempts + 1, started_at = now() WHERE id = :id AND status = 'queued';
INSERT INTO bq_attempt (task_id, runner, heartbeat_at) VALUES (:id, 'bench', now());
INSERT INTO bq_event (task_id, type, data, created_at) VALUES (:id, 'claimed', '{"to": "running"}', now());
END;
"""
CLAIM_SCHEMA = """\
DROP TABLE IF EXISTS bq, bq_attempt, bq_event;
CREATE TABLE bq (id serial PRIMARY KEY, priority int NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now(),
                 status text NOT NULL, attempts int NOT NULL DEFAULT 0, started_at timestamptz);
CREATE INDEX bq_claim ON bq (status, priority DESC, created_at);
CREATE TABLE bq_attempt (id serial PRIMARY KEY, task_id int NOT NULL REFERENCES bq, runner text, heartbeat_at timestamptz);
CREATE TABLE bq_event (id serial PRIMARY KEY, task_id int NOT NULL REFERENCES bq, type text, data jsonb,
                       created_at timestamptz);
"""
CLAIM_RESET = "TRUNCATE bq_attempt, bq_event; UPDATE bq SET status = 'queued', attempts = 0, started_at = NULL;"


# --- pgbench --------------------------------------------------------------------------------------
class PgBench:
    def __init__(self, workdir: Path) -> None:
        self.binary = pgbench_path()
        if self.binary is None:
            raise SystemExit("pgbench not found (apt-get install postgresql-client): it is the floor of this bench")
        self.url = pg_database("pgbench")
        self.workdir = workdir
        self.run("-i", "-q", "-s", "10")
        self.psql(CLAIM_SCHEMA + "INSERT INTO bq (status) SELECT 'queued' FROM generate_series(1, 50000);")
        (workdir / "claim.sql").write_text(CLAIM_SQL)

    def run(self, *args: str) -> str:
        done = subprocess.run([self.binary, *args, self.url], capture_output=True, text=True, cwd=self.workdir)
        if done.returncode:
            raise RuntimeError(f"pgbench {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def psql(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql)

    def tps(self, *args: str) -> float:
        out = self.run(*args)
        return float(re.search(r"tps = ([\d.]+)", out).group(1))

    def connect_ms(self, clients: int, seconds: int) -> float:
        out = self.run("-C", "-S", "-c", str(clients), "-j", "2", "-T", str(seconds))
        return float(re.search(r"average connection time = ([\d.]+) ms", out).group(1))


# --- claim and slot workers (forked processes, each with its own connection) ------------------------
def _claim_worker(barrier, seconds: float, out) -> None:
    from registry.services import task_claim

    runner = f"bench-{uuid.uuid4().hex[:6]}"
    barrier.wait()
    stop = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < stop:
        if task_claim(runner_id=runner) is None:
            break
        count += 1
    out.put(count)


def _slot_worker(barrier, seconds: float, repository_id: int, out) -> None:
    from repopool.models import Repository
    from repopool.services import slot_allocate, slot_release

    repository = Repository.objects.get(pk=repository_id)
    barrier.wait()
    stop = time.perf_counter() + seconds
    latencies = []
    while time.perf_counter() < stop:
        start = time.perf_counter()
        lease = slot_allocate(repository=repository, holder="bench", wait_seconds=60)
        (lease.path / "scratch.txt").write_text("agent output\n")
        slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
        latencies.append(time.perf_counter() - start)
    out.put(latencies)


def _git_worker(barrier, seconds: float, path: str, out) -> None:
    barrier.wait()
    stop = time.perf_counter() + seconds
    latencies = []
    while time.perf_counter() < stop:
        start = time.perf_counter()
        (Path(path) / "scratch.txt").write_text("agent output\n")
        subprocess.run(["git", "reset", "-q", "--hard"], cwd=path, env=GIT_ENV, check=True)
        subprocess.run(["git", "clean", "-ffdxq"], cwd=path, env=GIT_ENV, check=True)
        latencies.append(time.perf_counter() - start)
    out.put(latencies)


def in_processes(target, n: int, seconds: float, *args) -> tuple[float, list]:
    """Run ``target`` in ``n`` forked processes started together; returns (elapsed, their results)."""
    from django.db import connections

    connections.close_all()  # a forked child must open its own connection
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, seconds, *args, out)) for _ in range(n)]
    for p in procs:
        p.start()
    barrier.wait()
    started = time.perf_counter()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    elapsed = time.perf_counter() - started
    for p in procs:
        p.join()
    return elapsed, results


# --- main -----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big", type=int, default=50_000)
    args = parser.parse_args()
    rounds, seconds, clients = args.rounds, args.seconds, args.clients

    data = django_in_tempdir("bench-registry-")
    from django.contrib.auth import get_user_model
    from django.db import connection
    from rest_framework.authtoken.models import Token

    from registry.models import Attempt, Task, TaskEvent
    from registry.services import event_append, task_create
    from repopool.services import pool_warm, repository_create

    # A small real repository for tasks and slots (the lease machinery is what is measured here;
    # bench/pool.py measures a large one).
    origin = data / "origin"
    origin.mkdir()
    for i in range(20):
        (origin / f"module_{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    git(origin, "init", "-q", "-b", "main")
    git(origin, "add", "-A")
    git(origin, "commit", "-q", "-m", "init")
    repo = repository_create(name="bench", url=str(origin), pool_size=16)
    staff = get_user_model().objects.create_user(username="bench", is_staff=True)
    auth = {"Authorization": f"Token {Token.objects.create(user=staff).key}", "Content-Type": "application/json"}
    events_task = task_create(title="events", instructions="x", repository=repo, owner=staff)
    for i in range(49):
        event_append(task_id=events_task.pk, type="note", message=f"step {i}", data={"i": i})
    for i in range(1000 - Task.objects.count()):
        task_create(title=f"t{i}", instructions="fix it", repository=repo, owner=staff)
    Task.objects.update(status="succeeded")  # the claim bench queues its own
    pgb = PgBench(data)

    def post(c: int, n: int):
        body = {"title": f"c{c}-{n}", "instructions": "Make add() add.", "repository": repo.pk}
        return "POST", "/api/tasks/", json.dumps(body).encode(), auth

    http_cases = {
        "GET /api/health/": (lambda c, n: ("GET", "/api/health/", None, {}), 200),
        "POST /api/tasks/": (post, 201),
        "GET /api/tasks/<id>/events/": (lambda c, n: ("GET", f"/api/tasks/{events_task.pk}/events/", None, auth), 200),
        "GET /api/tasks/ (1,000 tasks)": (lambda c, n: ("GET", "/api/tasks/", None, auth), 200),
    }
    results: dict[tuple[str, str], list[tuple[float, list[float]]]] = {}
    floors: dict[str, list[float]] = {"pgbench tpcb": [], "pgbench -S": [], "connect ms": []}
    variants = {"conn age 0": {"DJANGO_CONN_MAX_AGE": "0"}, "conn age 60": {"DJANGO_CONN_MAX_AGE": "60"}}
    print(f"API on PostgreSQL, gunicorn -w 4, DEBUG off, {clients} clients, {rounds} rounds of {seconds:g} s")
    with gunicorn(env=variants["conn age 0"]) as port0, gunicorn(env=variants["conn age 60"]) as port60:
        ports = {"conn age 0": port0, "conn age 60": port60}

        def http_round(names) -> None:
            for name in names:
                make, expect = http_cases[name]
                for variant, port in ports.items():
                    results.setdefault((name, variant), []).append(
                        http_load(port, make, clients=clients, seconds=seconds, expect=expect)
                    )

        for make, expect in http_cases.values():  # warm-up: imports, first connections
            for port in ports.values():
                http_load(port, make, clients=clients, seconds=0.5, expect=expect)
        for _ in range(rounds):
            http_round(list(http_cases))
            floors["pgbench tpcb"].append(pgb.tps("-c", "8", "-j", "2", "-T", str(int(seconds))))
            floors["pgbench -S"].append(pgb.tps("-S", "-c", "8", "-j", "2", "-T", str(int(seconds))))
            floors["connect ms"].append(pgb.connect_ms(8, int(seconds)))

        # The list at --big tasks: fill with bulk inserts (not timed), then the same interleaving.
        big_name = f"GET /api/tasks/ ({args.big:,} tasks)"
        http_cases[big_name] = http_cases["GET /api/tasks/ (1,000 tasks)"]
        missing = args.big - Task.objects.count()
        for start in range(0, missing, 5000):
            Task.objects.bulk_create(
                Task(title=f"b{start + i}", instructions="x", repository=repo, owner=staff, status="succeeded")
                for i in range(min(5000, missing - start))
            )
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
        for _ in range(rounds):
            http_round([big_name])

    def row(label: str, samples: list[tuple[float, list[float]]], floor: float | None = None) -> str:
        rates = [rate for rate, _ in samples]
        lat = [x for _, flat in samples for x in flat]
        ratio = f"  {median(rates) / floor:7.3f}" if floor else ""
        return (
            f"  {label:44s} {spread(rates):>22s} req/s   p50 {percentile(lat, 0.5) * 1000:6.1f} ms"
            f"   p99 {percentile(lat, 0.99) * 1000:7.1f} ms{ratio}"
        )

    tpcb, read_only = median(floors["pgbench tpcb"]), median(floors["pgbench -S"])
    print(f"  floor: pgbench -c 8 -j 2 TPC-B-like {spread(floors['pgbench tpcb'], fmt='{:.0f}')} TPS;", end="")
    print(f" -S (read-only) {spread(floors['pgbench -S'], fmt='{:.0f}')} TPS;", end="")
    print(f" new connection (pgbench -C) {spread(floors['connect ms'])} ms")
    print(f"  {'':44s} {'median (p25–p75)':>22s}                                        / pgbench")
    for name in http_cases:
        for variant in variants:
            floor = tpcb if name.startswith("POST") else read_only
            print(row(f"{name} [{variant}]", results[(name, variant)], floor))

    # --- claims -----------------------------------------------------------------------------------
    queued = 5000
    Task.objects.bulk_create(
        Task(title=f"q{i}", instructions="x", repository=repo, status="queued") for i in range(queued)
    )
    queued_ids = list(Task.objects.filter(status="queued").values_list("pk", flat=True))

    def requeue() -> None:
        Attempt.objects.filter(task_id__in=queued_ids).delete()
        TaskEvent.objects.filter(task_id__in=queued_ids).delete()
        Task.objects.filter(pk__in=queued_ids).update(status="queued", attempts_count=0, started_at=None)

    claims: dict[int, list[float]] = {1: [], 8: []}
    claim_floor: dict[int, list[float]] = {1: [], 8: []}
    for _ in range(rounds):
        for n in (1, 8):
            requeue()
            elapsed, counts = in_processes(_claim_worker, n, seconds)
            if sum(counts) >= queued:
                print(f"  (warning: {n} claimers emptied the queue; raise the queue size)")
            claims[n].append(sum(counts) / elapsed)
            pgb.psql(CLAIM_RESET)
            claim_floor[n].append(pgb.tps("-n", "-f", "claim.sql", "-c", str(n), "-j", str(min(n, 2)), "-T", "3"))
    print(f"claims (task_claim in N processes, {queued:,} queued), {rounds} rounds of {seconds:g} s:")
    for n in (1, 8):
        ratio = median(claims[n]) / median(claim_floor[n])
        print(
            f"  {n} claimer(s): {spread(claims[n], fmt='{:.0f}')} claims/s   floor (same SQL in pgbench, {n} clients)"
            f" {spread(claim_floor[n], fmt='{:.0f}')} TPS   ratio {ratio:.3f}"
        )

    # --- slots ------------------------------------------------------------------------------------
    pool_warm(repository=repo)
    clones = []
    for i in range(16):
        path = data / f"floor{i}"
        git(data, "clone", "-q", str(origin), str(path))
        clones.append(str(path))
    slot_rates, slot_lat, git_rates, git_lat = [], [], [], []
    for _ in range(rounds):
        elapsed, lat = in_processes(_slot_worker, 16, seconds, repo.pk)
        flat = [x for bucket in lat for x in bucket]
        slot_rates.append(len(flat) / elapsed)
        slot_lat += flat
        # The floor: each process on its own clone (a list per process, handed out by index).
        from django.db import connections

        connections.close_all()
        ctx = multiprocessing.get_context("fork")
        barrier, out = ctx.Barrier(17), ctx.Queue()
        procs = [ctx.Process(target=_git_worker, args=(barrier, seconds, clones[i], out)) for i in range(16)]
        for p in procs:
            p.start()
        barrier.wait()
        started = time.perf_counter()
        flat = [x for _ in procs for x in out.get(timeout=seconds + 120)]
        git_rates.append(len(flat) / (time.perf_counter() - started))
        git_lat += flat
        for p in procs:
            p.join()
    print(f"slots: allocate (default branch, fetch) + release, 16 processes over 16 slots, {rounds} rounds:")
    print(
        f"  pool      {spread(slot_rates)} cycles/s   p50 {percentile(slot_lat, 0.5) * 1000:.0f} ms"
        f"   p99 {percentile(slot_lat, 0.99) * 1000:.0f} ms"
    )
    print(
        f"  git floor {spread(git_rates)} cycles/s   p50 {percentile(git_lat, 0.5) * 1000:.0f} ms"
        f"   p99 {percentile(git_lat, 0.99) * 1000:.0f} ms   (reset --hard + clean -ffdx, own clone each)"
    )
    print(f"  ratio {median(slot_rates) / median(git_rates):.3f} of the floor's throughput")


if __name__ == "__main__":
    main()
