"""Services of our own that a fault test may stop and start: a PostgreSQL cluster and a Redis
server, each in a temp folder on a port of its own (never the shared instances)."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path(os.environ.get("AGENTRUNNER_PG_BIN", "/usr/lib/postgresql/15/bin"))
# Ports of this suite (overridable): PostgreSQL from 18550, Redis from 18560, servers from 18570.
PG_PORTS = range(int(os.environ.get("AGENTRUNNER_FAULTS_PG_PORT", "18550")), 18560)
REDIS_PORTS = range(int(os.environ.get("AGENTRUNNER_FAULTS_REDIS_PORT", "18560")), 18570)
SERVER_PORTS = range(int(os.environ.get("AGENTRUNNER_FAULTS_SERVER_PORT", "18570")), 18600)
SCRATCH = Path(os.environ.get("AGENTRUNNER_FAULTS_DIR", "/tmp/ar-faults"))


def free_port(candidates: range) -> int:
    for port in candidates:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {candidates.start}-{candidates.stop - 1}")


def wait_for(condition, timeout: float = 30, message: str = "condition", interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class OwnPostgres:
    """A throwaway PostgreSQL cluster (trust auth) that tests stop and start at will."""

    def __init__(self) -> None:
        SCRATCH.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="pg-", dir=SCRATCH))
        self.data = self.folder / "data"
        self.sockets = self.folder / "sock"
        self.port = free_port(PG_PORTS)
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the postgres user
            self._as = ["runuser", "-u", "postgres", "--"]
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        self.sockets.mkdir()
        if self._as:
            os.chown(self.sockets, owner.pw_uid, owner.pw_gid)
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _pg(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*self._as, str(PG_BIN / program), *args], capture_output=True, text=True, timeout=120, cwd="/"
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done

    def url(self, dbname: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "-t", "60", "start"
        )

    def stop(self) -> None:
        """Stop at once: open connections are cut, as when the database host restarts."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return self._pg("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def createdb(self, name: str, template: str = "template1") -> str:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def query(self, dbname: str, sql: str, *params) -> list[tuple]:
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def destroy(self) -> None:
        if self.running():
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


class OwnRedis:
    """A throwaway redis-server without persistence, stopped and started on the same port."""

    def __init__(self) -> None:
        SCRATCH.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="redis-", dir=SCRATCH))
        self.port = free_port(REDIS_PORTS)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_for(answers, timeout=20, message=f"redis on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)
        self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def manage_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "manage.py"), *args]


def base_env(data_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a server or runner process of a fault test: our variables only as given."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI", "AGENTRUNNER_", "DJANGO_", "CELERY_", "ARTIFACTS_", "REPO_POOL_"))
        and k != "DATABASE_URL"
    }
    env.update(
        DJANGO_SETTINGS_MODULE="agentrunner.settings",
        DATABASE_URL=database_url,
        AGENTRUNNER_DATA_DIR=str(data_dir),
        AGENTRUNNER_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Server:
    """The project's server (gunicorn) in its own process group on fixed addresses, so a test can
    kill it outright (SIGKILL to master and workers) and start it again where runners expect it."""

    def __init__(self, *, data_dir: Path, database_url: str, binds: list[str], env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.binds = binds
        self.env = base_env(data_dir, database_url, AGENTRUNNER_AUTO_ENQUEUE="0", **(env or {}))
        self.log_path = data_dir / "gunicorn.log"
        self.process: subprocess.Popen | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://{self.binds[0]}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        args = [sys.executable, "-m", "gunicorn", "agentrunner.wsgi", "-k", "gthread", "-w", "1", "--threads", "8",
                "--timeout", "120", "--graceful-timeout", "5"]  # fmt: skip
        for bind in self.binds:
            args += ["-b", bind]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

        def answers() -> bool:
            assert self.process.poll() is None, f"gunicorn exited:\n{self.log()[-3000:]}"
            try:
                with socket.create_connection(tuple(self.binds[-1].rsplit(":", 1)), timeout=1):  # type: ignore[arg-type]
                    return True
            except OSError:
                return False

        wait_for(answers, timeout=60, message="gunicorn to listen")

    def kill(self) -> None:
        """SIGKILL to the whole server (master and workers): no graceful anything."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class RunnerNetns:
    """A runner host of its own: a Linux network namespace joined to this host by veth pairs, each a
    private /30. ``api`` carries the traffic to our server (the link a test cuts); ``model`` the
    traffic to the model's server (the outside world, which stays reachable)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"arf-{tag}"
        # Two /30s in 10.250.0.0/16, picked at random so parallel runs do not meet.
        block = random.randrange(0, 15000) * 4
        self.api_host, self.api_runner = _addr(block + 1), _addr(block + 2)
        self.model_host, self.model_runner = _addr(block + 64001), _addr(block + 64002)
        self.api_link = f"arfa{tag}"
        self.model_link = f"arfm{tag}"
        _ip("netns", "add", self.name)
        try:
            _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
            for link, host, runner in ((self.api_link, self.api_host, self.api_runner),
                                       (self.model_link, self.model_host, self.model_runner)):  # fmt: skip
                _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}r")
                _ip("link", "set", f"{link}r", "netns", self.name)
                _ip("addr", "add", f"{host}/30", "dev", link)
                _ip("link", "set", link, "up")
                _ip("netns", "exec", self.name, "ip", "addr", "add", f"{runner}/30", "dev", f"{link}r")
                _ip("netns", "exec", self.name, "ip", "link", "set", f"{link}r", "up")
        except Exception:
            self.destroy()
            raise

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        _ip("link", "set", self.api_link, "down")

    def restore(self) -> None:
        _ip("link", "set", self.api_link, "up")

    def destroy(self) -> None:
        for link in (self.api_link, self.model_link):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


def _addr(n: int) -> str:
    return f"10.250.{(n >> 8) & 255}.{n & 255}"
