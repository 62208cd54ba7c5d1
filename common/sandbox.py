"""The sandbox seam: every command a repository brings (setup, tests) runs through here.

A ``SandboxPolicy`` says what one command may do (its writable root, the network, its limits);
``sandbox_argv`` turns a shell command into the argv that runs it. With bubblewrap the command
sees a read-only root, its own slot writable (its ``.git`` read-only), a private /tmp and an empty
HOME, no process of ours (own pid namespace), only loopback (own network namespace) unless the
policy grants the network, and none of the data directory: not the database file, not another
slot, not the results, artifacts or spool. The whole box dies with the command, with its timeout
and with the runner (``--die-with-parent``).

Limits hold with or without bubblewrap: a per-command cgroup (pids, memory) where one is writable,
rlimits (address space, file size; processes when we are not root and no cgroup is writable).

``AGENTRUNNER_SANDBOX``: ``bwrap`` requires bubblewrap; ``none`` runs commands unsandboxed (the
operator's explicit choice); ``auto`` uses bubblewrap when it works on this host and otherwise
falls back to ``none`` loudly, but only with DEBUG on: a production runner refuses to run a
command without a sandbox it was not told to do without.

Django-free except ``SandboxConfig.from_settings``, which reads the settings lazily.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import DomainError

log = logging.getLogger(__name__)

MODES = ("auto", "bwrap", "none")
# Every namespace; a user namespace for certain, with no capability in it (root in the box keeps
# uid 0 but could otherwise unmount what hides the data dir) and no nested one.
ISOLATION = ("--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL")
ISOLATION += ("--die-with-parent", "--new-session")
HOME_IN_BOX = "/home/sandbox"
# Where daemons keep their Unix sockets (PostgreSQL, MySQL, Docker, D-Bus, gunicorn...). A socket
# on the read-only root is still connectable: its own network namespace does not keep the box from
# a service's local socket, so these folders are covered like the data dir.
SOCKET_DIRS = (Path("/run"), Path("/var/run"))
PROC_KNOBS = ("/proc/sys", "/proc/sysrq-trigger")
SYSTEM_DIRS = {Path(p) for p in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/opt", "/var", "/srv", "/proc")}
# Dot folders that hold credentials: never re-bound whole, even when a PATH entry lies inside.
SENSITIVE_DOT_DIRS = {".ssh", ".gnupg", ".aws", ".azure", ".config", ".docker", ".kube", ".local", ".netrc"}
# Credential files a toolchain folder may hold (cargo, pip, npm): masked with an empty file.
MASKED_FILES = ("credentials", "credentials.toml", ".npmrc", ".pypirc", ".netrc", "auth.json")


class SandboxUnavailable(DomainError):
    """Commands are refused: the sandbox was required (or production asked for it) and cannot run."""

    status_code = 503
    code = "sandbox_unavailable"


@dataclass(frozen=True)
class SandboxConfig:
    """The operator's choices (settings), resolved once per process."""

    configured: str = "auto"  # auto | bwrap | none
    bwrap: str = "bwrap"
    debug: bool = True
    data_dir: Path | None = None
    hidden: tuple[Path, ...] = ()  # besides /root, /home and the data dir
    ro_paths: tuple[Path, ...] | None = None  # None: the defaults (interpreter, toolchains on PATH)
    memory_bytes: int | None = 8 * 1024**3
    max_processes: int | None = 1024
    max_file_bytes: int | None = 4 * 1024**3
    output_bytes: int = 8 * 1024**2
    cgroup: bool = True

    @classmethod
    def from_settings(cls) -> SandboxConfig:
        from django.conf import settings

        # Where the pool, results, artifacts, spool and run folders live, even when configured
        # outside the data dir: none of it is any command's business but its own slot.
        hidden = [
            Path(getattr(settings, name)).resolve()
            for name in ("REPO_POOL_ROOT", "RESULTS_ROOT", "ARTIFACTS_ROOT", "SPOOL_ROOT", "TMP_ROOT")
            if getattr(settings, name, None)
        ]
        # The default data dir inside the project checkout: when the data dir was moved, the
        # laptop's old database (users, API tokens) may still be there, under the readable root.
        hidden.append((Path(settings.BASE_DIR) / "var").resolve())
        database = settings.DATABASES["default"]
        if database["ENGINE"].endswith("sqlite3"):
            for name in (database.get("NAME"), database.get("TEST", {}).get("NAME")):
                if name and str(name) != ":memory:" and not str(name).startswith("file:"):
                    hidden.append(Path(name).resolve().parent)  # the database and its -wal/-shm
        elif str(database.get("HOST") or "").startswith("/"):
            hidden.append(Path(database["HOST"]).resolve())  # the database server's socket folder
        ro_paths = getattr(settings, "AGENTRUNNER_SANDBOX_RO_PATHS", None)
        return cls(
            configured=getattr(settings, "AGENTRUNNER_SANDBOX", "auto"),
            bwrap=getattr(settings, "AGENTRUNNER_BWRAP", "bwrap"),
            debug=bool(settings.DEBUG),
            data_dir=Path(settings.DATA_DIR).resolve(),
            hidden=tuple(hidden),
            ro_paths=None if ro_paths is None else tuple(Path(p) for p in ro_paths),
            memory_bytes=getattr(settings, "AGENTRUNNER_SANDBOX_MEMORY_BYTES", cls.memory_bytes) or None,
            max_processes=getattr(settings, "AGENTRUNNER_SANDBOX_MAX_PROCESSES", cls.max_processes) or None,
            max_file_bytes=getattr(settings, "AGENTRUNNER_SANDBOX_MAX_FILE_BYTES", cls.max_file_bytes) or None,
            output_bytes=getattr(settings, "AGENTRUNNER_SANDBOX_OUTPUT_BYTES", cls.output_bytes),
            cgroup=getattr(settings, "AGENTRUNNER_SANDBOX_CGROUP", True),
        )


@dataclass(frozen=True)
class SandboxPolicy:
    """What one command may do. ``None`` limits come from the config."""

    writable: Path  # the slot: the only place the command may write (besides its private /tmp)
    network: bool = False
    # Folders of the runner's own the command may write too (where a test runner leaves its JUnit
    # report), bound at the same path so the command finds them where the environment says.
    extra_writable: tuple[Path, ...] = ()
    memory_bytes: int | None = None
    max_processes: int | None = None
    max_file_bytes: int | None = None
    output_bytes: int | None = None
    # Paths inside ``writable`` the command may read, not change: the slot's kept paths (a .venv
    # the setup made), which survive resets and so serve the next task, maybe another user's.
    readonly: tuple[str, ...] = ()

    def resolved(self, config: SandboxConfig) -> SandboxPolicy:
        return SandboxPolicy(
            writable=Path(self.writable).resolve(),
            network=self.network,
            extra_writable=tuple(Path(p).resolve() for p in self.extra_writable),
            readonly=tuple(self.readonly),
            memory_bytes=self.memory_bytes or config.memory_bytes,
            max_processes=self.max_processes or config.max_processes,
            max_file_bytes=self.max_file_bytes or config.max_file_bytes,
            output_bytes=self.output_bytes or config.output_bytes,
        )


# --- which mode ---------------------------------------------------------------------------------
_probe_lock = threading.Lock()
_probe_cache: dict[str, tuple[bool, str]] = {}


def probe_bwrap(bwrap: str) -> tuple[bool, str]:
    """Does bubblewrap work on this host (namespaces allowed)? Probed once per process and path."""
    with _probe_lock:
        if bwrap not in _probe_cache:
            _probe_cache[bwrap] = _probe(bwrap)
        return _probe_cache[bwrap]


def _probe(bwrap: str) -> tuple[bool, str]:
    path = shutil.which(bwrap)
    if path is None:
        return False, f"bubblewrap not found ({bwrap}); install the package 'bubblewrap'"
    argv = [path, *ISOLATION, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    argv += ["--tmpfs", "/tmp", "--", "true"]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"bubblewrap at {path} does not start: {type(exc).__name__}: {exc}"
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()[-300:]
        return False, f"bubblewrap at {path} cannot create namespaces on this host: {message}"
    return True, f"bubblewrap at {path}"


def resolve_mode(config: SandboxConfig) -> tuple[str, str]:
    """("bwrap" | "none", reason). Raises SandboxUnavailable when commands must be refused."""
    if config.configured not in MODES:
        raise SandboxUnavailable(f"AGENTRUNNER_SANDBOX must be one of {', '.join(MODES)}, not {config.configured!r}")
    if config.configured == "none":
        return "none", "AGENTRUNNER_SANDBOX=none (set by the operator)"
    works, reason = probe_bwrap(config.bwrap)
    if works:
        return "bwrap", reason
    if config.configured == "bwrap":
        raise SandboxUnavailable(f"AGENTRUNNER_SANDBOX=bwrap but {reason}")
    if not config.debug:
        raise SandboxUnavailable(
            f"no sandbox: {reason}. Refusing to run repository commands unsandboxed in production; "
            "install bubblewrap, or set AGENTRUNNER_SANDBOX=none to accept the risk"
        )
    return "none", f"AGENTRUNNER_SANDBOX=auto and {reason} (DEBUG on: falling back to no sandbox)"


_warned: set[str] = set()


def current_mode(config: SandboxConfig | None = None) -> tuple[str, str]:
    config = config or SandboxConfig.from_settings()
    mode, reason = resolve_mode(config)
    if mode == "none" and reason not in _warned:
        _warned.add(reason)
        log.warning("COMMANDS RUN WITHOUT A SANDBOX: %s", reason)
    return mode, reason


def sandbox_status(config: SandboxConfig | None = None) -> dict:
    """For /api/health/ and the task's events: the mode, why, and which limits hold."""
    config = config or SandboxConfig.from_settings()
    try:
        mode, reason = resolve_mode(config)
    except SandboxUnavailable as exc:
        mode, reason = "unavailable", exc.message
    cgroups = writable_cgroups() if config.cgroup else {}
    is_root = os.geteuid() == 0
    limits = {
        "memory": "cgroup+rlimit" if "memory" in cgroups else "rlimit",
        "processes": "cgroup" if "pids" in cgroups else ("not enforced (root)" if is_root else "rlimit"),
        "file_size": "rlimit",
        "output": f"{config.output_bytes} bytes kept",
    }
    return {"mode": mode, "configured": config.configured, "reason": reason, "limits": limits}


# --- the bubblewrap command line ------------------------------------------------------------------
def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def default_ro_paths(hidden: list[Path]) -> list[Path]:
    """The toolchains a command needs from hidden folders: the running interpreter's installation
    and, for each PATH entry inside a hidden folder, its toolchain (the nearest dot folder such as
    ~/.pyenv, ~/.nvm, ~/.asdf, else the entry itself). Never a credentials folder.

    The interpreter's virtualenv too (``sys.prefix``, as named and as resolved): the demo and
    the usual test commands run ``sys.executable``, which lives in the project's .venv, under
    /home on a laptop or /tmp in a fresh clone."""
    paths = [Path(sys.base_prefix).resolve(), Path(sys.prefix).absolute(), Path(sys.prefix).resolve()]
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry or not os.path.isabs(entry):
            continue
        entry_path = Path(entry)
        owner = next((h for h in hidden if _under(entry_path, h)), None)
        if owner is None or entry_path == owner:
            continue
        chosen = entry_path
        for ancestor in [entry_path, *entry_path.parents]:
            if ancestor == owner:
                break
            if ancestor.name.startswith("."):
                chosen = ancestor if ancestor.name not in SENSITIVE_DOT_DIRS else entry_path
        if any(part in SENSITIVE_DOT_DIRS for part in chosen.parts):
            continue
        paths.append(chosen)
    unique: list[Path] = []
    for path in paths:
        if path not in unique and path.exists():
            unique.append(path)
    return unique


def is_symlink_inside(root: Path, path: Path) -> bool:
    """Is some component of ``path`` below ``root`` a symlink (after resolving, a race)?"""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            return True
    return False


def sandbox_argv(command: str, policy: SandboxPolicy, config: SandboxConfig) -> list[str]:
    """The bubblewrap argv that runs ``command`` (a shell command line) under ``policy``.

    Order matters: a later mount lands on top of an earlier one. Root read-only, then the hidden
    folders covered with empty tmpfs, then the toolchains re-bound read-only, then the slot
    writable and its .git read-only on top.
    """
    bwrap = shutil.which(config.bwrap) or config.bwrap
    slot = Path(policy.writable).resolve()
    hidden = [Path("/root"), Path("/home")]
    hidden += [folder for folder in SOCKET_DIRS if not folder.is_symlink()]
    if config.data_dir is not None:
        hidden.append(config.data_dir)
    hidden += [Path(h) for h in config.hidden]
    ro_paths = list(config.ro_paths) if config.ro_paths is not None else default_ro_paths(hidden)

    argv = [bwrap, *ISOLATION, "--share-net" if policy.network else "--unshare-net", "--hostname", "sandbox"]
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    # The kernel's knobs under the fresh /proc stay writable for a box whose uid 0 is the host's
    # root (a runner started as root): kernel.core_pattern names a program the kernel runs as
    # root outside every namespace. bubblewrap covers them only when it judges them writable.
    for knob in PROC_KNOBS:
        if os.path.exists(knob):
            argv += ["--ro-bind", knob, knob]
    for folder in hidden:
        if len(folder.parts) < 2 or folder in SYSTEM_DIRS:
            continue  # never cover the system (a database configured at /db.sqlite3, say)
        if folder.is_dir() and not _under(folder, Path("/tmp")):  # /tmp is a fresh tmpfs already
            argv += ["--tmpfs", str(folder)]
    # /etc/resolv.conf often points into /run (systemd-resolved): a box granted the network still
    # resolves names.
    resolv = Path("/etc/resolv.conf").resolve()
    if resolv.is_file() and any(_under(resolv, folder) for folder in SOCKET_DIRS):
        argv += ["--ro-bind", str(resolv), str(resolv)]
    for path in ro_paths:
        path = Path(path).absolute()  # as named: a symlinked .venv is bound where commands call it
        if path.exists() and any(_under(path, h) for h in [*hidden, Path("/tmp")]):
            argv += ["--ro-bind", str(path.resolve()), str(path)]
            for name in MASKED_FILES:
                if (path / name).is_file():
                    argv += ["--ro-bind", "/dev/null", str(path / name)]
    argv += ["--tmpfs", HOME_IN_BOX]
    argv += ["--bind", str(slot), str(slot)]
    if (slot / ".git").exists():
        argv += ["--ro-bind", str(slot / ".git"), str(slot / ".git")]
    for folder in policy.extra_writable:
        argv += ["--bind", str(folder), str(folder)]
    for keep in policy.readonly:
        # Resolved (the slot is hostile: a link must not point the bind elsewhere), made when
        # missing so the command cannot create it, and only ever inside the slot.
        real = (slot / keep.strip("/")).resolve()
        if real == slot or not _under(real, slot) or is_symlink_inside(slot, real):
            continue
        try:
            real.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue  # a file there: nothing the command can grow into a kept folder
        argv += ["--ro-bind", str(real), str(real)]
    argv += ["--setenv", "HOME", HOME_IN_BOX, "--setenv", "TMPDIR", "/tmp", "--chdir", str(slot)]
    argv += ["--", "/bin/sh", "-c", command]
    return argv


# --- limits: rlimits and a per-command cgroup ---------------------------------------------------
CGROUP_V1_ROOTS = {"pids": Path("/sys/fs/cgroup/pids"), "memory": Path("/sys/fs/cgroup/memory")}
CGROUP_V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


def _own_cgroup_paths() -> dict[str, str]:
    """controller -> our own cgroup path (``""`` key for the v2 hierarchy)."""
    paths: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


_cgroup_cache: dict[str, Path] | None = None


def writable_cgroups() -> dict[str, Path]:
    """controller -> the folder under which we may create per-command cgroups (our own cgroup,
    so a command never escapes the limits the runner itself runs under). Probed once."""
    global _cgroup_cache
    if _cgroup_cache is not None:
        return _cgroup_cache
    found: dict[str, Path] = {}
    own = _own_cgroup_paths()
    for controller, root in CGROUP_V1_ROOTS.items():
        if controller in own and (root / "cgroup.procs").exists():
            base = root / own[controller].lstrip("/")
            if _can_create(base, f"{controller}.max" if controller == "pids" else "memory.limit_in_bytes"):
                found[controller] = base
    if "" in own and not found:
        for root in CGROUP_V2_ROOTS:
            base = root / own[""].lstrip("/")
            try:
                controllers = (base / "cgroup.subtree_control").read_text().split()
            except OSError:
                continue
            for controller in ("pids", "memory"):
                if controller in controllers and _can_create(
                    base, "pids.max" if controller == "pids" else "memory.max"
                ):
                    found[controller] = base
            if found:
                break
    _cgroup_cache = found
    return found


def _can_create(base: Path, control_file: str) -> bool:
    probe = base / f"agentrunner-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        return (probe / control_file).exists() and os.access(probe / control_file, os.W_OK)
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


@dataclass
class CommandCgroup:
    """One cgroup per command (per controller on v1): limits, then kill everything in it."""

    dirs: list[Path] = field(default_factory=list)

    @classmethod
    def create(cls, policy: SandboxPolicy) -> CommandCgroup:
        group = cls()
        name = f"agentrunner-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        bases = writable_cgroups()
        _remove_stale_cgroups(bases)
        for base in bases.values():
            folder = base / name
            if folder in group.dirs:
                continue  # v2: one folder serves both controllers
            try:
                folder.mkdir()
                group.dirs.append(folder)
                if policy.max_processes:
                    _write(folder / "pids.max", str(policy.max_processes))
                if policy.memory_bytes:
                    for control in ("memory.limit_in_bytes", "memory.max"):
                        _write(folder / control, str(policy.memory_bytes))
            except OSError as exc:
                log.warning("cgroup %s not usable: %s", folder, exc)
        return group

    def procs_files(self) -> list[bytes]:
        return [str(folder / "cgroup.procs").encode() for folder in self.dirs]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for folder in self.dirs:
            try:
                found.update(int(p) for p in (folder / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return found

    def kill_all(self, deadline: float = 5.0) -> None:
        """SIGKILL every process in the group until none is left (forks raced with the kill)."""
        for folder in self.dirs:
            _write(folder / "pids.max", "0")  # a fork bomb cannot grow while we kill it
        ends = time.monotonic() + deadline
        while time.monotonic() < ends:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)
        log.warning("processes survived their command's cgroup kill: %s", sorted(self.pids()))

    def remove(self) -> None:
        for folder in self.dirs:
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)  # killed processes not yet reaped by the kernel


_stale_checked = False


def _remove_stale_cgroups(bases: dict[str, Path]) -> None:
    """Once per process: remove the cgroups a killed runner left (its pid gone, the group empty:
    its processes died with it through --die-with-parent)."""
    global _stale_checked
    if _stale_checked:
        return
    _stale_checked = True
    for base in set(bases.values()):
        try:
            entries = list(base.glob("agentrunner-*-*"))
        except OSError:
            continue
        for folder in entries:
            owner = folder.name.split("-")[1]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                try:
                    folder.rmdir()  # refused while a process is still in it
                except OSError:
                    pass


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:
        pass


# Joins the cgroup(s) named before "--", sets the rlimits, then execs the rest. A shell instead of
# a preexec_fn: Python code in a forked child of a big runner process costs tens of milliseconds
# (copy-on-write of every page it touches) and is not safe with threads; a vfork + one exec of
# /bin/sh costs about one. POSIX units: ulimit -f in 512-byte blocks, -v in KiB.
_LAUNCH_JOIN = (
    'for f; do [ "$f" = -- ] && break; echo $$ > "$f" || { echo "sandbox: cannot join $f" >&2; exit 125; }; '
    "shift; done; shift; "
)


def launcher(policy: SandboxPolicy, cgroup: CommandCgroup | None, *, use_nproc: bool):
    """(argv prefix, preexec_fn or None) that put the command in its cgroup under its rlimits."""
    if use_nproc:  # not root and no pids cgroup: RLIMIT_NPROC, whose ulimit flag no shell agrees on
        return [], make_preexec(policy, cgroup, use_nproc=True)
    script = _LAUNCH_JOIN
    if policy.memory_bytes:
        script += f"ulimit -v {max(1, policy.memory_bytes // 1024)} || exit 125; "
    if policy.max_file_bytes:
        script += f"ulimit -f {max(1, policy.max_file_bytes // 512)} || exit 125; "
    script += 'exec "$@"'
    procs = [p.decode() for p in cgroup.procs_files()] if cgroup else []
    return ["/bin/sh", "-c", script, "sandbox-launch", *procs, "--"], None


def make_preexec(policy: SandboxPolicy, cgroup: CommandCgroup | None, *, use_nproc: bool):
    """A preexec_fn that joins the cgroup and sets rlimits in the child, before exec (only where
    the launcher shell cannot: RLIMIT_NPROC). Only os.open/os.write and setrlimit in the child."""
    procs_files = cgroup.procs_files() if cgroup else []
    limits = []
    if policy.memory_bytes:
        limits.append((resource.RLIMIT_AS, policy.memory_bytes))
    if policy.max_file_bytes:
        limits.append((resource.RLIMIT_FSIZE, policy.max_file_bytes))
    if use_nproc and policy.max_processes:
        limits.append((resource.RLIMIT_NPROC, policy.max_processes))

    def preexec() -> None:
        pid = str(os.getpid()).encode()
        for procs in procs_files:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        for which, value in limits:
            soft, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))

    return preexec


# --- the backstop: processes left in a slot ------------------------------------------------------
def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                pid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def kill_processes_in(folder: Path) -> list[int]:
    """SIGKILL every process whose working directory or root lies inside ``folder`` (what an
    unsandboxed command, or a runner killed mid-command, left behind). Returns the pids killed."""
    folder = Path(folder).resolve()
    spared = _ancestors(os.getpid())  # never ourselves, nor whoever started us from in there
    killed: list[int] = []
    for _ in range(5):  # a process may fork while we scan; a few rounds catch the children
        round_killed = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in spared:
                continue
            pid = int(entry.name)
            for link in ("cwd", "root"):
                try:
                    target = Path(os.readlink(f"/proc/{pid}/{link}"))
                except OSError:
                    continue
                if link == "root" and target == Path("/"):
                    continue
                if _under(target, folder):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        round_killed.append(pid)
                    except (ProcessLookupError, PermissionError):
                        pass
                    break
        if not round_killed:
            break
        killed += round_killed
        time.sleep(0.02)
    if killed:
        log.warning("killed %d process(es) left in %s: %s", len(killed), folder, killed)
    return killed
