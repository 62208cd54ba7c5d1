"""Slots on the host that owns them: clone, reset, fetch, checkout, setup, removal.

No database: what the server's bookkeeping knows of a slot comes in as ``SlotSeen`` and what
changed goes back as ``Prepared``; the caller records it (in-process: ``repopool.services``; on a
runner host: the runner API). Two processes on one host never work in one copy at once: every
operation here holds the slot's ``flock`` (a file next to the slot, outside what sandboxed code
sees), so a reaped-and-re-leased slot is never reset under a prepare, nor prepared twice.

Raises only what ``common.outcomes`` names: ``RefNotFound`` (the ref does not exist: the slot is
fine), ``SlotBroken`` (the copy cannot be used: clone, reset or setup failed, or it is missing),
``GitError``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.outcomes import GitError, RefNotFound, SlotBroken
from common.procs import run_command, safe_env, tail_of
from common.sandbox import SandboxPolicy
from workcopy import config, git

log = logging.getLogger(__name__)

# A watched file is a lockfile or a requirements list; past this size only its size counts.
SETUP_HASH_READ_MAX = 64 * 1024 * 1024
_HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class RepoSpec:
    """What a runner host needs to know of a repository."""

    name: str
    url: str
    default_branch: str
    keep_paths: list[str] = field(default_factory=list)
    setup_command: str = ""
    setup_watch_files: list[str] = field(default_factory=list)
    setup_network: bool = True
    setup_timeout: int = 900


@dataclass(frozen=True)
class SlotSeen:
    """What the server's bookkeeping says of the slot (``commit`` empty: never prepared)."""

    path: Path
    commit: str = ""
    base_commit: str = ""
    setup_hash: str = ""
    fetched_at: float | None = None  # epoch seconds of the last fetch from origin
    needs_reset: bool = False  # its lease expired on this host: reset before use


@dataclass(frozen=True)
class Prepared:
    commit: str  # checked out, detached
    setup_hash: str
    fetched: bool  # origin was fetched (or cloned) now
    base_commit: str = ""  # set when the default branch was resolved now: what a reset returns to


def spec_from_dict(data: dict) -> RepoSpec:
    """A RepoSpec from its JSON form (the runner API's ``repository``); unknown keys are ignored."""
    names = RepoSpec.__dataclass_fields__.keys()
    return RepoSpec(**{name: data[name] for name in names if name in data})


def seen_from_dict(data: dict, *, pool_root: Path) -> SlotSeen:
    """A SlotSeen from its JSON form (the runner API's ``slot``): a relative ``path`` is under this
    host's ``pool_root``; ``fetched_at`` an ISO 8601 time or epoch seconds."""
    from datetime import datetime

    path = Path(data["path"])
    if not path.is_absolute():
        path = Path(pool_root) / path
    fetched_at = data.get("fetched_at")
    if isinstance(fetched_at, str):
        fetched_at = datetime.fromisoformat(fetched_at.replace("Z", "+00:00")).timestamp()
    return SlotSeen(
        path=path,
        commit=data.get("commit") or "",
        base_commit=data.get("base_commit") or "",
        setup_hash=data.get("setup_hash") or "",
        fetched_at=float(fetched_at) if fetched_at is not None else None,
        needs_reset=bool(data.get("needs_reset")),
    )


def slot_dir(repository_name: str, index: int, *, pool_root: Path | None = None) -> Path:
    """Where slot ``index`` of a repository lives on this host."""
    return Path(pool_root or config.current().pool_root) / repository_name / str(index)


@contextlib.contextmanager
def slot_lock(path: Path) -> Iterator[None]:
    """Hold the slot's lock: one process at a time works in a copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f"{path.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def prepare(spec: RepoSpec, seen: SlotSeen, ref: str, *, fetch_ttl: float, fetch: bool = True) -> Prepared:
    """Make the slot a clean copy of ``ref`` (the default branch when empty), detached.

    Clones when the slot was never prepared, resets when its lease expired here (``needs_reset``),
    fetches when ``ref`` may have moved (no fetch within ``fetch_ttl`` seconds; a commit id present
    needs none), runs the setup command on a fresh clone or when a watched file changed."""
    ref = ref or spec.default_branch
    path = Path(seen.path)
    with slot_lock(path):
        if not seen.commit:
            return _clone_and_checkout(spec, path, ref)
        if not (path / ".git").is_dir():
            raise SlotBroken(f"working copy {path} is missing")
        head = seen.commit
        if seen.needs_reset:
            head = seen.base_commit or seen.commit
            _reset(spec, path, head)
        refresh = fetch and (seen.fetched_at is None or time.time() - seen.fetched_at >= fetch_ttl)
        if not seen.needs_reset and not refresh and _already_at(spec, seen, ref):
            # Reset clean at the wanted commit, fetched recently: nothing for git to do. The .git
            # checks and repairs are file operations (no process), so a replaced .git still breaks it.
            git.secure_slot(path)
            commit = seen.commit
        else:
            commit = git.resolve_or_fetch(path, ref, url=spec.url, refresh=refresh)
            # After a reset HEAD is the slot's commit (the reset records it): an unchanged ref needs no checkout.
            if commit != head:
                git.checkout_detached(path, commit)
        current_hash = seen.setup_hash
        if spec.setup_watch_files and setup_hash(spec, path) != seen.setup_hash:
            run_setup(spec, path)
            current_hash = setup_hash(spec, path)
        # The default branch's latest known commit is what a reset returns to from now on.
        base = commit if ref == spec.default_branch else ""
        return Prepared(commit=commit, setup_hash=current_hash, fetched=refresh, base_commit=base)


def _already_at(spec: RepoSpec, seen: SlotSeen, ref: str) -> bool:
    """The bookkeeping shows the copy at ``ref`` already: the commit itself, or the default branch
    when the copy sits at its base (every resolution of the default branch moves the base along)."""
    if not seen.commit:
        return False
    if ref == seen.commit:
        return True
    return ref == spec.default_branch and seen.commit == seen.base_commit


def _clone_and_checkout(spec: RepoSpec, path: Path, ref: str) -> Prepared:
    """A new copy: clone, the default branch set up, then ``ref`` checked out. Any failure but a
    missing ref is the slot's (SlotBroken)."""
    try:
        git.clone(spec.url, path)
        base = git.resolve_or_fetch(path, spec.default_branch, url=spec.url)
        # The same state a reset leaves: detached at the commit, no local branches.
        git.reset_clean(path, base, list(spec.keep_paths))
        run_setup(spec, path)
        digest = setup_hash(spec, path)
        # A first status stores fresh stat data in the index (the checkout wrote the files in the
        # index's own instant, so each would be read and hashed by the first task's change check).
        git.has_changes(path, list(spec.keep_paths))
    except SlotBroken:
        raise
    except GitError as exc:
        raise SlotBroken(exc.message) from None
    commit = base
    if ref != spec.default_branch:
        commit = git.resolve_or_fetch(path, ref, url=spec.url)  # RefNotFound: the copy is fine
        if commit != base:
            git.checkout_detached(path, commit)
            if spec.setup_watch_files and setup_hash(spec, path) != digest:
                run_setup(spec, path)
                digest = setup_hash(spec, path)
    return Prepared(commit=commit, setup_hash=digest, fetched=True, base_commit=base)


def clone_base(spec: RepoSpec, path: Path) -> Prepared:
    """A new copy at the default branch, set up (warming a pool)."""
    with slot_lock(path):
        return _clone_and_checkout(spec, Path(path), spec.default_branch)


def reset(spec: RepoSpec, path: Path, commit: str) -> None:
    """Clean reset after a lease: exactly ``commit``, nothing of the task left (SlotBroken on failure)."""
    with slot_lock(path):
        _reset(spec, Path(path), commit)


def _reset(spec: RepoSpec, path: Path, commit: str) -> None:
    try:
        git.reset_clean(path, commit, list(spec.keep_paths))
    except (GitError, OSError) as exc:
        raise SlotBroken(f"reset failed: {getattr(exc, 'message', None) or exc}") from None


def remove(path: Path) -> None:
    """Remove a slot from this host's disk, with the pool's copy of its git config."""
    path = Path(path)
    with slot_lock(path):
        try:
            git.remove_tree(path)
        except OSError as exc:  # what stays is logged; the pool makes the copy again elsewhere or later
            log.warning("could not remove all of slot %s: %s", path, exc)
        git.trusted_config_path(path).unlink(missing_ok=True)
    (path.parent / f"{path.name}.lock").unlink(missing_ok=True)


def has_copy(path: Path) -> bool:
    return (Path(path) / ".git").is_dir()


# --- setup ----------------------------------------------------------------------------------------
def setup_hash(spec: RepoSpec, path: Path) -> str:
    """The setup command and the watched files. Those files were just written by hostile code
    (the setup command itself): read in bounded chunks, up to a bounded size, regular files only
    (never a FIFO that would block the runner)."""
    digest = hashlib.sha256(spec.setup_command.encode())
    for name in spec.setup_watch_files:
        digest.update(name.encode() + b"\0")
        try:
            fd = os.open(Path(path) / name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            digest.update(f"{info.st_size}\0".encode())
            left = SETUP_HASH_READ_MAX
            while left > 0 and (chunk := handle.read(min(_HASH_CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()


def run_setup(spec: RepoSpec, path: Path) -> None:
    """The repository's setup command in the slot, sandboxed, with its timeout (SlotBroken on failure)."""
    if not spec.setup_command.strip():
        return
    folder = config.current().tmp_root
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"setup-{spec.name}-{uuid.uuid4().hex[:8]}.log"
    try:
        result = run_command(
            spec.setup_command,
            cwd=path,
            timeout=spec.setup_timeout,
            output_path=out,
            env=safe_env(),
            policy=SandboxPolicy(writable=Path(path), network=spec.setup_network),
        )
        tail = tail_of(out, 2000)
    finally:
        out.unlink(missing_ok=True)
    if result.timed_out:
        raise SlotBroken(f"setup command timed out after {spec.setup_timeout}s: {tail}")
    if not result.ok:
        raise SlotBroken(f"setup command exited with {result.exit_code}: {tail}")


__all__ = [
    "GitError", "Prepared", "RefNotFound", "RepoSpec", "SlotBroken", "SlotSeen", "clone_base", "has_copy", "prepare",
    "remove", "reset", "run_setup", "seen_from_dict", "setup_hash", "slot_dir", "slot_lock", "spec_from_dict",
]  # fmt: skip
