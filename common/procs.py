"""Running commands the user configured (setup and test commands): inside the sandbox
(common.sandbox), with a timeout, everything the command started killed when it ends, is
cancelled or times out, bounded output, and an environment built from an allow-list, so no secret
of ours (API keys, database URLs, the Django secret) reaches code we did not write."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.sandbox import (
    CommandCgroup,
    SandboxConfig,
    SandboxPolicy,
    current_mode,
    launcher,
    sandbox_argv,
    writable_cgroups,
)

# Variables a build or test command legitimately needs; everything else is dropped.
ENV_ALLOW = (
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "TMPDIR", "USER", "LOGNAME", "SHELL",
    "PYTHONPATH", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX",
    "PIP_CONSTRAINT", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
    # Where the host's CA certificates are (a company proxy's, say): paths, never secrets, and
    # without them a setup command's pip or npm cannot reach the registry through that proxy.
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
)  # fmt: skip
ENV_DENY_MARKERS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "DATABASE_URL", "BROKER")


# ``scheme://user:password@host``: the userinfo of a URL is a credential (a private index's token).
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def strip_credentials(value: str) -> str:
    """``value`` with the userinfo of every URL in it removed (``https://u:p@host`` -> ``https://host``)."""
    return _URL_USERINFO.sub(lambda match: match.group("scheme"), value)


def safe_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for user commands: allow-listed variables only, never a secret (no variable
    named like one, no credentials inside a URL)."""
    env = {name: os.environ[name] for name in ENV_ALLOW if name in os.environ}
    env.update(extra or {})
    for name in list(env):
        if any(marker in name.upper() for marker in ENV_DENY_MARKERS):
            del env[name]
        else:
            env[name] = strip_credentials(env[name])
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
    sandbox: str = "bwrap"  # how the command ran: bwrap | none
    output_dropped: int = 0  # bytes of output beyond the kept bound, not written

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


class _BoundedOutput:
    """Writes the first ``limit`` bytes to the file, then keeps only a tail in memory (written at
    the end after a marker): a command printing without end fills neither the disk nor memory."""

    TAIL_KEEP = 64 * 1024

    def __init__(self, fh, limit: int):
        self.fh, self.limit = fh, limit
        self.written = 0
        self.dropped = 0
        self.tail = bytearray()

    def write(self, data: bytes) -> None:
        room = self.limit - self.written
        if room > 0:
            self.fh.write(data[:room])
            self.written += min(room, len(data))
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.TAIL_KEEP:
                self.dropped += len(self.tail) - self.TAIL_KEEP
                del self.tail[: len(self.tail) - self.TAIL_KEEP]

    def close(self) -> None:
        if self.dropped:
            self.fh.write(f"\n[... {self.dropped} bytes of output dropped ...]\n".encode())
        self.fh.write(bytes(self.tail))


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
    policy: SandboxPolicy | None = None,
    config: SandboxConfig | None = None,
) -> CommandResult:
    """Run ``command`` in a shell inside the sandbox (``policy``: by default ``cwd`` writable and
    no network), output to ``output_path`` (written by us, outside the box, bounded).

    The whole command ends with it: on exit, timeout or ``should_stop()`` every process of it is
    killed (the sandbox's pid namespace, its cgroup, its process group). Raises SandboxUnavailable
    when no sandbox may run it (see common.sandbox).
    """
    config = config or SandboxConfig.from_settings()
    policy = (policy or SandboxPolicy(writable=Path(cwd))).resolved(config)
    mode, _reason = current_mode(config)
    env = dict(env if env is not None else safe_env())
    if mode == "bwrap":
        argv = sandbox_argv(command, policy, config)
    else:
        argv = ["/bin/sh", "-c", command]
    cgroup = CommandCgroup.create(policy) if config.cgroup and writable_cgroups() else None
    use_nproc = os.geteuid() != 0 and not (cgroup and "pids" in writable_cgroups())
    prefix, preexec = launcher(policy, cgroup, use_nproc=use_nproc)
    argv = prefix + argv

    started = time.monotonic()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    timed_out = cancelled = False
    with open(output_path, "wb") as out:
        sink = _BoundedOutput(out, policy.output_bytes or 8 * 1024**2)
        try:
            proc = subprocess.Popen(
                argv,
                cwd=str(cwd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except BaseException:
            if cgroup:
                cgroup.remove()
            raise
        try:
            timed_out, cancelled = _pump(proc, sink, started, timeout, should_stop, poll_interval)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            # Whatever the command left behind dies with it: its group, and its cgroup (which
            # also holds what escaped the group with setsid).
            _kill_group(proc)
            if cgroup:
                cgroup.kill_all()
            proc.wait()
            _drain(proc, sink)
            proc.stdout.close()
            if cgroup:
                cgroup.remove()
            sink.close()
    return CommandResult(
        exit_code=proc.returncode if not (timed_out or cancelled) else None,
        timed_out=timed_out,
        cancelled=cancelled,
        duration=time.monotonic() - started,
        output_path=output_path,
        tail=tail_of(output_path, tail_chars),
        sandbox=mode,
        output_dropped=sink.dropped,
    )


def _pump(proc, sink, started, timeout, should_stop, poll_interval) -> tuple[bool, bool]:
    """Copy output until the command exits (its pipe closes) or must stop; (timed_out, cancelled)."""
    fd = proc.stdout.fileno()
    next_check = 0.0
    while True:
        now = time.monotonic()
        if now >= next_check:
            next_check = now + poll_interval
            if now - started > timeout:
                _kill_group(proc)
                return True, False
            if should_stop is not None and should_stop():
                _kill_group(proc)
                return False, True
        ready, _, _ = select.select([fd], [], [], max(0.0, min(poll_interval, next_check - now)))
        if ready:
            data = os.read(fd, 65536)
            if not data:  # every writer is gone
                proc.wait()
                return False, False
            sink.write(data)
        elif proc.poll() is not None:
            # Exited, but something it left (unsandboxed) still holds the pipe: stop reading.
            return False, False


def _drain(proc, sink, seconds: float = 0.5) -> None:
    """What is left in the pipe after the command was killed (never waits long on a holder)."""
    fd = proc.stdout.fileno()
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        ready, _, _ = select.select([fd], [], [], max(0.0, ends - time.monotonic()))
        if not ready:
            return
        data = os.read(fd, 65536)
        if not data:
            return
        sink.write(data)
