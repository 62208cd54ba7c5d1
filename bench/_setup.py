"""Shared bench plumbing: scratch databases and folders, gunicorn, a real repository, statistics.

Every bench uses its own throwaway PostgreSQL database (created on the server named by
BENCH_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/postgres, named ``ar_bench_*`` or
``$BENCH_DB_PREFIX*``, and dropped at exit), its own temp folder and free ports, so a developer's DATABASE_URL, data folder and port 8000 are never
touched.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
PG_SERVER = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "b",
    "GIT_AUTHOR_EMAIL": "b@example.com",
    "GIT_COMMITTER_NAME": "b",
    "GIT_COMMITTER_EMAIL": "b@example.com",
}
_cleanups: list[Callable[[], None]] = []


@atexit.register
def _cleanup() -> None:
    while _cleanups:
        with contextlib.suppress(Exception):
            _cleanups.pop()()


def _signal_exit(signum, frame) -> None:  # Ctrl-C or kill: still drop databases and folders
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _signal_exit)


# --- scratch resources ----------------------------------------------------------------------------
def temp_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _cleanups.append(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def _admin(sql: str) -> None:
    import psycopg

    try:
        conn = psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        parts = urlsplit(PG_SERVER)
        shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))  # never print a password
        raise SystemExit(
            f"bench: PostgreSQL is not reachable at {shown} (set BENCH_POSTGRES_URL to a server where this user "
            f"may create databases): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    with conn:
        conn.execute(sql)


def pg_database(label: str, *, template: str | None = None) -> str:
    """Create a database of our own (empty, or a copy of the database at URL ``template``, which
    must have no open connection) and return its URL; it is dropped at exit."""
    # BENCH_DB_PREFIX / BENCH_DB_TAG (e.g. "rp_") keep one person's scratch databases apart on a shared server.
    name = f"{os.environ.get('BENCH_DB_PREFIX', 'ar_bench_')}{os.environ.get('BENCH_DB_TAG', '')}{label}_{os.getpid()}"
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    copy = f' TEMPLATE "{urlsplit(template).path.lstrip("/")}"' if template else ""
    _admin(f'CREATE DATABASE "{name}"{copy}')
    _cleanups.append(lambda: _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    parts = urlsplit(PG_SERVER)
    return urlunsplit(parts._replace(path=f"/{name}"))


def django_in_tempdir(prefix: str, *, database: str = "postgres") -> Path:
    """Point Agent Runner at a fresh data folder and a fresh database ("postgres" or "sqlite"), migrate.

    DEBUG is off, as in production; local repositories under the temp folder are allowed.
    """
    data = temp_dir(prefix)
    (data / "static").mkdir()  # WhiteNoise's root with DEBUG off; nothing static is timed
    os.environ["AGENTRUNNER_DATA_DIR"] = str(data)
    if database == "postgres":
        os.environ["DATABASE_URL"] = pg_database(prefix.strip("-").replace("-", "_"))
    else:
        os.environ["DATABASE_URL"] = f"sqlite:///{data / 'bench.sqlite3'}"
    os.environ["DJANGO_SETTINGS_MODULE"] = "agentrunner.settings"
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret-key-" + "x" * 40)
    os.environ["AGENTRUNNER_LOCAL_REPO_ROOTS"] = f"{data},{tempfile.gettempdir()}"
    os.environ.setdefault("AGENTRUNNER_LOG_LEVEL", "WARNING")
    os.environ.pop("CELERY_BROKER_URL", None)  # no worker here: the health check must not wait on one
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return data


def free_port() -> int:
    """A free port: from BENCH_PORTS ("18800-18899") when set (a shared machine), else any."""
    low, _, high = os.environ.get("BENCH_PORTS", "").partition("-")
    candidates = range(int(low), int(high) + 1) if low and high else [0]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in BENCH_PORTS={os.environ['BENCH_PORTS']}")


@contextlib.contextmanager
def gunicorn(
    *, workers: int = 4, threads: int = 0, env: dict[str, str] | None = None, with_pid: bool = False
) -> Iterator[int] | Iterator[tuple[int, int]]:
    """gunicorn on a free port with the current settings environment (plus ``env``); yields the port
    (with its master's pid when ``with_pid``). ``threads``: the gthread worker class with that many
    threads a worker (as ``make serve``), else sync."""
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "agentrunner.wsgi", "-w", str(workers), "-b", f"127.0.0.1:{port}"]
        + (["-k", "gthread", "--threads", str(threads)] if threads else [])
        + ["--timeout", "600", "--log-level", "warning"],
        cwd=ROOT,
        env=full_env,
    )
    _cleanups.append(lambda: server.poll() is None and (server.kill(), server.wait()))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/api/health/")
                conn.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("gunicorn did not start") from None
                time.sleep(0.1)
        yield (port, server.pid) if with_pid else port
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


# --- a real repository ----------------------------------------------------------------------------
def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True
    ).stdout.strip()


def small_repo(dest: Path, files: int = 20) -> Path:
    """A git repository of ``files`` small modules on ``main``, one commit (where the repository's
    size is not what is measured)."""
    dest.mkdir()
    for i in range(files):
        (dest / f"module_{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "init")
    return dest


def build_django_repo(dest: Path) -> int:
    """A git repository of the installed Django package's own source (thousands of files, no download)."""
    import django

    source = Path(django.__file__).parent
    shutil.copytree(source, dest / "django", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / ".gitignore").write_text("*.pyc\n__pycache__/\nbuild/\n.venv/\n")
    (dest / "README.md").write_text("Django's source, as a benchmark repository.\n")
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "import")
    return int(git(dest, "ls-files", "-z").count("\0"))


# --- statistics -----------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    """'median (p25–p75)' of a sample."""
    m, lo, hi = (scale * x for x in (median(values), percentile(values, 0.25), percentile(values, 0.75)))
    return f"{fmt.format(m)} ({fmt.format(lo)}–{fmt.format(hi)})"


def pgbench_path() -> str | None:
    found = shutil.which("pgbench") or sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    return found if isinstance(found, str) else (found[-1] if found else None)


# --- forked workers -------------------------------------------------------------------------------
def in_processes(target, n: int, seconds: float, *args, each: list[tuple] | None = None) -> tuple[float, list]:
    """Run ``target(barrier, seconds, *args, *each[i], out)`` in ``n`` forked processes started
    together, each with a database connection of its own; returns (elapsed from the start to the
    last result, their results in arrival order)."""
    import multiprocessing

    from django.db import connections

    connections.close_all()  # a forked child must open its own connection
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(barrier, seconds, *args, *(each[i] if each else ()), out)) for i in range(n)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    started = time.perf_counter()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    elapsed = time.perf_counter() - started
    for p in procs:
        p.join()
    return elapsed, results


# --- an HTTP load driver --------------------------------------------------------------------------
def http_load(
    port: int,
    make_request: Callable[[int, int], tuple[str, str, bytes | None, dict[str, str]]],
    *,
    clients: int,
    seconds: float,
    expect: int = 200,
) -> tuple[float, list[float]]:
    """``clients`` threads, each on one keep-alive connection, for ``seconds``.

    ``make_request(client, n)`` returns (method, path, body, headers). Returns requests per second and
    the latencies. A response other than ``expect`` stops the run with an error.
    """
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    stop_at = [0.0]
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = latencies[index]
        barrier.wait()
        n = 0
        while time.perf_counter() < stop_at[0] and not errors:
            method, path, body, headers = make_request(index, n)
            start = time.perf_counter()
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            mine.append(time.perf_counter() - start)
            if response.status != expect:
                errors.append(f"{method} {path}: {response.status} {payload[:300]!r}")
            n += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(errors[0])
    flat = [x for bucket in latencies for x in bucket]
    return len(flat) / elapsed, flat


# --- wrk: a C load client, as pgbench is a C client --------------------------------------------------
_WRK_SCRIPT = """
local threads = {}
local n = 0
setup = function(thread) thread:set("tid", #threads); table.insert(threads, thread) end
init = function(args) bad = 0; first_bad = "" end
request = function()
  n = n + 1
  local body = nil
  if body_head ~= nil then body = body_head .. tid .. "-" .. n .. body_tail end
  return wrk.format(method, path, headers, body)
end
response = function(status, headers, body)
  if status ~= expect then
    bad = bad + 1
    if first_bad == "" then first_bad = status .. " " .. string.sub(body, 1, 300) end
  end
end
done = function(summary, latency, requests)
  local b, first = 0, ""
  for _, t in ipairs(threads) do
    b = b + t:get("bad")
    if first == "" then first = t:get("first_bad") end
  end
  local e = summary.errors
  io.write(string.format("WRK requests=%d duration_us=%d p50_us=%d p99_us=%d bad=%d socket_errors=%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), b,
    e.connect + e.read + e.write + e.timeout))
  if first ~= "" then io.write("WRK_FIRST_BAD " .. first .. "\\n") end
end
"""


def _lua_string(text: str) -> str:
    return "[==[" + text.replace("]==]", "") + "]==]"


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_load(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: str | None = None,
    clients: int,
    seconds: float,
    expect: int = 200,
) -> tuple[float, float, float]:
    """``clients`` keep-alive connections driven by wrk (2 threads, as ``pgbench -j 2``) for
    ``seconds`` (whole seconds, at least 1). ``body``, when given, carries the marker ``{n}``, which
    each request replaces with a number of its own (e.g. a unique title). Returns requests per
    second, p50 and p99 latency in seconds. A response other than ``expect`` (or a socket error)
    stops the run with an error."""
    script = temp_dir("bench-wrk-") / "load.lua"
    head, _, tail = (body or "").partition("{n}")
    lua_headers = ", ".join(f"[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in (headers or {}).items())
    script.write_text(
        f"method = {_lua_string(method)}\npath = {_lua_string(path)}\nexpect = {expect}\n"
        f"headers = {{{lua_headers}}}\n"
        + (f"body_head = {_lua_string(head)}\nbody_tail = {_lua_string(tail)}\n" if body is not None else "")
        + _WRK_SCRIPT
    )
    done = subprocess.run(
        [
            wrk_path() or "wrk",
            "-t", str(min(2, clients)),
            "-c", str(clients),
            "-d", f"{max(1, round(seconds))}s",
            "--timeout", "60s",
            "-s", str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    shutil.rmtree(script.parent, ignore_errors=True)
    found = dict(
        kv.split("=") for line in done.stdout.splitlines() if line.startswith("WRK ") for kv in line.split()[1:]
    )
    if done.returncode or not found:
        raise RuntimeError(f"wrk failed: {done.stderr.strip() or done.stdout.strip()}")
    if int(found["bad"]) or int(found["socket_errors"]):
        first = next((line for line in done.stdout.splitlines() if line.startswith("WRK_FIRST_BAD")), "")
        raise RuntimeError(
            f"{method} {path}: {found['bad']} answers other than {expect}, {found['socket_errors']} socket errors {first}"
        )
    requests, duration = int(found["requests"]), int(found["duration_us"]) / 1e6
    return requests / duration, int(found["p50_us"]) / 1e6, int(found["p99_us"]) / 1e6
