"""The system under test for tests/integration: our own gunicorn, or a deployed instance.

By default `start_local()` serves the project the production way (gunicorn, DEBUG off, a PostgreSQL
database of its own that it creates and drops, a data folder of its own, a free port) and makes a
staff user, its API token and a runner token with `manage.py`. With the service URLs and a staff
token in the environment, `from_environment()` points the same suite at a deployed instance:

    TASK_REGISTRY_URL, REPO_POOL_URL, ARTIFACT_STORE_URL   base URLs (http://host:8000), may differ
    AGENTRUNNER_API_TOKEN                                   a staff user's API token
    AGENTRUNNER_RUNNER_TOKEN                                a runner token (no API creates one)
    AGENTRUNNER_INTEGRATION_REPO_ROOT                       where the suite makes its git repositories;
                                                            the server must be allowed to read them
                                                            (its AGENTRUNNER_LOCAL_REPO_ROOTS)
Each service is reached through its own client, so the three may be served from different hosts."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SERVICE_URL_VARS = ("TASK_REGISTRY_URL", "REPO_POOL_URL", "ARTIFACT_STORE_URL")
# Our own variables are never inherited by the server we start: it gets exactly what we give it.
OUR_PREFIXES = (
    "OPENAI",
    "AGENTRUNNER_",
    "DJANGO_",
    "CELERY_",
    "ARTIFACTS_",
    "REPO_POOL_",
    "TASK_REGISTRY",
    "ARTIFACT_",
)


class DeploymentConfigError(Exception):
    """The environment names a deployed instance only in part."""


def base_url(url: str) -> str:
    """A service's root URL: `http://host:8000`, `http://host:8000/`, `http://host:8000/api/` and
    `http://host:8000/api/runner/v1/` all name the same server (as the runner's client reads them);
    a prefix the server is mounted under (`http://host/agent-runner`) is kept."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DeploymentConfigError(f"not an http(s) URL: {url!r}")
    path = parts.path.rstrip("/")
    for suffix in ("/api/runner/v1", "/api"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class ServiceClient:
    """One service's HTTP client: its own base URL and credentials, timeouts, no retries (a test
    asserts what the server answered, so nothing is papered over)."""

    def __init__(self, name: str, url: str, token: str, *, scheme: str = "Token", timeout: float = 60) -> None:
        self.name = name
        self.url = base_url(url)
        self.token = token
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"{scheme} {token}"} if token else {},
            timeout=httpx.Timeout(timeout, connect=10),
        )

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.http.request(method, path, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.http.post(path, **kwargs)

    def put(self, path: str, **kwargs) -> httpx.Response:
        return self.http.put(path, **kwargs)

    def delete(self, path: str, **kwargs) -> httpx.Response:
        return self.http.delete(path, **kwargs)

    def stream(self, method: str, path: str, **kwargs):
        return self.http.stream(method, path, **kwargs)

    def close(self) -> None:
        self.http.close()


def expect(response: httpx.Response, status: int) -> dict | list:
    """The JSON body of a response that must have `status`; else an assertion naming what came."""
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url} -> {response.status_code}, expected {status}: "
        f"{response.text[:2000]}"
    )
    if not response.content:
        return {}
    return response.json()


@dataclass
class Deployment:
    """Where the three services answer, and who we are to them."""

    mode: str  # "local" (our gunicorn) or "deployed"
    registry_url: str
    pool_url: str
    artifacts_url: str
    staff_token: str
    runner_token: str  # "" when no runner token could be had
    repo_root: Path  # where git repositories the server may read are made
    server_env: dict[str, str] = field(default_factory=dict)  # local mode: the gunicorn's environment
    _clients: list[ServiceClient] = field(default_factory=list)

    def client(self, service: str, *, token: str | None = None, scheme: str = "Token") -> ServiceClient:
        url = {"registry": self.registry_url, "pool": self.pool_url, "artifacts": self.artifacts_url}[service]
        made = ServiceClient(service, url, self.staff_token if token is None else token, scheme=scheme)
        self._clients.append(made)
        return made

    def runner_client(self, service: str) -> ServiceClient:
        if not self.runner_token:
            raise DeploymentConfigError(
                "no runner token: set AGENTRUNNER_RUNNER_TOKEN (manage.py create_runner_token <name> on the server)"
            )
        return self.client(service, token=self.runner_token, scheme="Bearer")

    def close(self) -> None:
        for made in self._clients:
            made.close()
        self._clients.clear()


def from_environment(environ: dict[str, str] | None = None) -> Deployment | None:
    """The deployed instance the environment names, or None when it names none (then the suite
    starts its own server). Naming it in part is an error, not a silent fallback."""
    environ = dict(os.environ if environ is None else environ)
    given = {name: environ.get(name, "").strip() for name in SERVICE_URL_VARS}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if not environ.get("AGENTRUNNER_API_TOKEN", "").strip():
        missing.append("AGENTRUNNER_API_TOKEN")
    if missing:
        raise DeploymentConfigError(
            "a deployed instance needs all of TASK_REGISTRY_URL, REPO_POOL_URL, ARTIFACT_STORE_URL and "
            f"AGENTRUNNER_API_TOKEN (a staff user's token); missing: {', '.join(missing)}"
        )
    repo_root = Path(
        environ.get("AGENTRUNNER_INTEGRATION_REPO_ROOT") or Path(os.environ.get("TMPDIR", "/tmp")) / "agentrunner-it"
    )
    repo_root.mkdir(parents=True, exist_ok=True)
    return Deployment(
        mode="deployed",
        registry_url=base_url(given["TASK_REGISTRY_URL"]),
        pool_url=base_url(given["REPO_POOL_URL"]),
        artifacts_url=base_url(given["ARTIFACT_STORE_URL"]),
        staff_token=environ["AGENTRUNNER_API_TOKEN"].strip(),
        runner_token=environ.get("AGENTRUNNER_RUNNER_TOKEN", "").strip(),
        repo_root=repo_root.resolve(),
    )


# --- our own server -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _database_urls(database_url: str, name: str) -> tuple[str, str]:
    """(maintenance URL, URL of database `name`) on the PostgreSQL server `database_url` names."""
    parts = urlsplit(database_url)
    maintenance = urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))
    own = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))
    return maintenance, own


def _psql_conninfo(url: str) -> str:
    return url.replace("postgresql://", "postgres://", 1)


def create_database(database_url: str) -> tuple[str, str]:
    """Create an empty database next to the one `database_url` names; returns (its URL, its name)."""
    import psycopg

    base = urlsplit(database_url).path.lstrip("/") or "agentrunner"
    name = f"{base}_it_{uuid.uuid4().hex[:8]}"[:63]
    maintenance, own = _database_urls(database_url, name)
    with psycopg.connect(_psql_conninfo(maintenance), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return own, name


def drop_database(database_url: str, name: str) -> None:
    import psycopg

    maintenance, _ = _database_urls(database_url, name)
    with psycopg.connect(_psql_conninfo(maintenance), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def manage(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} exited {done.returncode}: {done.stderr[-3000:]}")
    return done.stdout


def has_command(name: str) -> bool:
    return any((ROOT / app / "management" / "commands" / f"{name}.py").exists() for app in _apps())


def _apps() -> list[str]:
    return [p.parent.parent.parent.name for p in ROOT.glob("*/management/commands/__init__.py")]


@dataclass
class LocalServer:
    process: subprocess.Popen
    url: str
    log_path: Path
    database_url: str
    database_name: str
    maintenance_source: str

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def server_env(*, data_dir: Path, database_url: str, repo_root: Path, broker_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(OUR_PREFIXES) and k != "DATABASE_URL"}
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=database_url,
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(40),
        AGENTRUNNER_DATA_DIR=str(data_dir),
        AGENTRUNNER_LOCAL_REPO_ROOTS=str(repo_root),
        AGENTRUNNER_LOG_LEVEL="WARNING",
        # Tasks stay queued for the suite's runners to claim: no Celery job is started for them.
        AGENTRUNNER_AUTO_ENQUEUE="0",
        # Uploads above this are refused (413): large enough for the suite's biggest artifact.
        ARTIFACTS_MAX_SIZE=str(1024**3),
    )
    if broker_url:
        env["CELERY_BROKER_URL"] = broker_url
    return env


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}: {log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/api/health/", timeout=5).status_code in (200, 503):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"nothing answered at {url} within {timeout}s: {log_path.read_text()[-4000:]}")


def start_local(workdir: Path, *, database_url: str, broker_url: str = "", workers: int = 2, threads: int = 8):
    """Migrate a fresh database, make the users and tokens, start gunicorn. Returns (Deployment,
    LocalServer); the caller stops the server and drops the database (`stop_local`)."""
    repo_root = (workdir / "repos").resolve()
    data_dir = (workdir / "data").resolve()
    repo_root.mkdir(parents=True)
    data_dir.mkdir(parents=True)
    own_url, name = create_database(database_url)
    server = None
    try:
        env = server_env(data_dir=data_dir, database_url=own_url, repo_root=repo_root, broker_url=broker_url)
        manage("migrate", "--noinput", "-v", "0", env=env)
        staff_token = manage("create_api_token", "it-staff", "--staff", env=env).strip().splitlines()[-1]
        runner_token = ""
        if has_command("create_runner_token"):
            runner_token = manage("create_runner_token", "it-runner", env=env).strip().splitlines()[-1].split()[-1]
        port = int(os.environ.get("AGENTRUNNER_INTEGRATION_PORT") or free_port())
        url = f"http://127.0.0.1:{port}"
        log_path = workdir / "gunicorn.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    str(VENV_BIN / "gunicorn"),
                    "agentrunner.wsgi",
                    "--workers",
                    str(workers),
                    "--worker-class",
                    "gthread",
                    "--threads",
                    str(threads),
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--timeout",
                    "600",
                    # Its default control socket is one path per user: concurrent servers would share it.
                    "--no-control-socket",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = LocalServer(process, url, log_path, own_url, name, database_url)
        wait_until_serving(url, process, log_path)
    except BaseException:
        if server is not None:
            server.stop()
        drop_database(database_url, name)
        raise
    deployment = Deployment(
        mode="local",
        registry_url=url,
        pool_url=url,
        artifacts_url=url,
        staff_token=staff_token,
        runner_token=runner_token,
        repo_root=repo_root,
        server_env=env,
    )
    return deployment, server


def stop_local(server: LocalServer, workdir: Path) -> None:
    try:
        server.stop()
    finally:
        drop_database(server.maintenance_source, server.database_name)
        shutil.rmtree(workdir / "data", ignore_errors=True)
