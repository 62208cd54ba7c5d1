"""The project's own server, served by gunicorn in a subprocess on the test's database: what a
remote runner talks to in the tests of the HTTP mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url() -> str:
    """The URL of the database this test process uses (pytest-django's test database)."""
    from django.db import connection

    db = connection.settings_dict
    assert connection.vendor == "postgresql", "a server in another process needs a shared database (PostgreSQL)"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


@dataclass
class Served:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    data_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve(*, data_dir: Path, env: dict[str, str] | None = None, threads: int = 8, port: int = 0) -> Served:
    """gunicorn with the project's WSGI app on the test database, its data under ``data_dir``;
    returns once it answers the health check."""
    port = port or free_port()
    log_path = data_dir / f"gunicorn-{port}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    full_env = {
        **{k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL",)},
        "DATABASE_URL": database_url(),
        "AGENTRUNNER_DATA_DIR": str(data_dir),
        "AGENTRUNNER_AUTO_ENQUEUE": "0",
        "AGENTRUNNER_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "agentrunner.wsgi", "-k", "gthread", "-w", "1"]
            + ["--threads", str(threads), "-b", f"127.0.0.1:{port}", "--timeout", "120", "--graceful-timeout", "5"],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    served = Served(f"http://127.0.0.1:{port}", process, log_path, data_dir)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {process.returncode}:\n{served.log()[-4000:]}")
        try:
            with urllib.request.urlopen(served.base_url + "/api/health/", timeout=2):
                return served
        except urllib.error.HTTPError:
            return served  # it answers (the health check may report a service it lacks here)
        except OSError:
            if time.monotonic() > deadline:
                served.stop()
                raise AssertionError(f"gunicorn did not answer within 60 s:\n{served.log()[-4000:]}") from None
            time.sleep(0.1)
