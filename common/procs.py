"""Running commands the user configured (setup and test commands): a timeout, the whole process
group killed on timeout or cancellation, and an environment built from an allow-list, so no secret
of ours (API keys, database URLs, the Django secret) reaches code we did not write."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Variables a build or test command legitimately needs; everything else is dropped.
ENV_ALLOW = (
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "TMPDIR", "USER", "LOGNAME", "SHELL",
    "PYTHONPATH", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX",
    "PIP_CONSTRAINT", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
)  # fmt: skip
ENV_DENY_MARKERS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "DATABASE_URL", "BROKER")


def safe_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for user commands: allow-listed variables only, never a secret."""
    env = {name: os.environ[name] for name in ENV_ALLOW if name in os.environ}
    env.update(extra or {})
    for name in list(env):
        if any(marker in name.upper() for marker in ENV_DENY_MARKERS):
            del env[name]
    # A virtualenv of ours must not leak into the repository's commands.
    venv = os.environ.get("VIRTUAL_ENV")
    if venv and "PATH" in env:
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(venv))
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


@dataclass
class CommandResult:
    exit_code: int | None
    timed_out: bool
    cancelled: bool
    duration: float
    output_path: Path | None
    tail: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.cancelled


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tail_of(path: Path, limit: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - limit))
        data = fh.read()
    text = data.decode("utf-8", errors="replace")
    return ("…" + text) if size > limit else text


def run_command(
    command: str,
    *,
    cwd: str | Path,
    timeout: float,
    output_path: Path,
    env: dict[str, str] | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_interval: float = 0.2,
    tail_chars: int = 4000,
) -> CommandResult:
    """Run ``command`` in a shell, in its own session/process group, output to ``output_path``.

    On timeout or when ``should_stop()`` turns true, the whole process group is killed with
    SIGKILL, so no grandchild survives.
    """
    started = time.monotonic()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "wb") as out:
        proc = subprocess.Popen(
            command,
            shell=True,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env if env is not None else safe_env(),
            start_new_session=True,
        )
        timed_out = cancelled = False
        try:
            while True:
                try:
                    proc.wait(timeout=poll_interval)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() - started > timeout:
                        timed_out = True
                    elif should_stop is not None and should_stop():
                        cancelled = True
                    if timed_out or cancelled:
                        _kill_group(proc)
                        proc.wait()
                        break
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
        # Reap what the command left behind in its group even when it exited normally.
        _kill_group(proc)
    return CommandResult(
        exit_code=proc.returncode if not (timed_out or cancelled) else None,
        timed_out=timed_out,
        cancelled=cancelled,
        duration=time.monotonic() - started,
        output_path=output_path,
        tail=tail_of(output_path, tail_chars),
    )
