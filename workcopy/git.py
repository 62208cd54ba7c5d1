"""The git seam: every git command the pool runs goes through here (real git, as a subprocess).

A working copy (slot) is written by hostile code: the model's files, the repository's setup and
test commands. Nothing its ``.git`` says may make git run a program here, so before every git
command on a slot (``_slot_git``):

- ``.git`` must be a real directory (not a symlink, not a ``gitdir:`` file pointing elsewhere), and
  git is told that directory explicitly (``GIT_DIR``/``GIT_WORK_TREE``: no discovery);
- ``.git/config`` is replaced by the pool's own copy, kept next to the slot where sandboxed code
  cannot reach it (written right after the clone, before anything hostile ran). That drops every
  key git could run a program from: ``core.fsmonitor``, ``core.hooksPath``, ``core.sshCommand``,
  ``core.gitProxy``, ``filter.*``/``diff.*``/``merge.*`` drivers that ``.gitattributes`` in the tree
  name, ``diff.external``, ``credential.helper``, ``alias.*``, ``include.path``/``includeIf``, a
  ``remote.origin.url`` turned into ``ext::``;
- the other files through which ``.git`` can redirect git are removed: ``commondir`` and
  ``config.worktree`` (another config), ``objects/info/alternates`` (someone else's objects),
  the legacy ``remotes/`` and ``branches/`` remote definitions.

On top, every git command runs with command-line config (which wins over repository config for
the same key) and an environment that allow only the https, ssh, git and file transports (never
``ext::``/``fd::``), no hooks, no fsmonitor, no credential helpers, no system or global config and
no prompts. Fetches name the repository's URL (from the database), never the slot's ``origin``.
URLs and paths follow ``--`` so none is read as an option, and each URL is checked by
``workcopy.urls_policy`` again right before git sees it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.outcomes import GitError, RefNotFound
from common.sandbox import kill_processes_in
from workcopy import config
from workcopy.urls_policy import UrlRefused, check_repository_url

# Never prompt for credentials, never run pagers, never pick up system or user config, and take
# the protocol policy from our command line only (GIT_PROTOCOL_FROM_USER=0).
GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "/bin/true",
    "SSH_ASKPASS": "/bin/true",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_ATTR_NOSYSTEM": "1",
    "GIT_PROTOCOL_FROM_USER": "0",
    "GIT_NO_REPLACE_OBJECTS": "1",
    "GIT_PAGER": "cat",
    "PAGER": "cat",
    "LC_ALL": "C",
}
BASE_CONFIG = [
    *("-c", "core.hooksPath=/dev/null"),
    *("-c", "core.fsmonitor=false"),
    # No prompt (host key, passphrase) can hang an unattended clone.
    *("-c", "core.sshCommand=ssh -o BatchMode=yes"),
    *("-c", "core.attributesFile=/dev/null"),
    *("-c", "core.pager=cat"),
    *("-c", "credential.helper="),
    *("-c", "protocol.allow=never"),
    *("-c", "protocol.https.allow=always"),
    *("-c", "protocol.ssh.allow=always"),
    *("-c", "protocol.git.allow=always"),
    *("-c", "protocol.file.allow=always"),
    *("-c", "protocol.ext.allow=never"),
    *("-c", "submodule.recurse=false"),
    *("-c", "fetch.recurseSubmodules=false"),
    *("-c", "advice.detachedHead=false"),
    *("-c", "gc.auto=0"),
    *("-c", "maintenance.auto=false"),
]
# What a slot's .git/config becomes when the pool's copy is missing (a slot cloned before the copy
# existed): enough for every operation here, which name the origin URL themselves.
MINIMAL_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n"
# Files in .git that make git read another config, other objects or another remote definition.
_REDIRECTING = ("commondir", "config.worktree", "objects/info/alternates", "objects/info/http-alternates")
_LEGACY_REMOTES = ("remotes", "branches")


class UrlNotAllowed(GitError):
    """A URL the policy refuses reached the git layer (a row stored before the policy, a
    push_url sent by the server): git never sees it."""

    code = "url_refused"


def _allowed_url(url: str, *, field: str = "url", extra_roots: tuple = ()) -> str:
    try:
        return check_repository_url(url, field=field, extra_roots=extra_roots)
    except UrlRefused as exc:
        raise UrlNotAllowed(exc.message, field=field) from None


def _env() -> dict[str, str]:
    env = {name: os.environ[name] for name in ("PATH", "HOME", "TMPDIR", "SSH_AUTH_SOCK") if name in os.environ}
    env.update(GIT_ENV)
    return env


def _run(
    args: tuple[str, ...] | list[str],
    *,
    cwd: str | Path | None,
    env: dict[str, str],
    timeout: float | None = None,
    check: bool = True,
    stdin: bytes | None = None,
) -> bytes:
    try:
        proc = subprocess.run(
            ["git", *BASE_CONFIG, *args],
            # Outside a slot git runs from "/", never from the server's own checkout.
            cwd=str(cwd) if cwd else "/",
            env=env,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout or config.current().git_timeout,
        )
    except subprocess.TimeoutExpired:
        raise GitError(f"git {_verb(args)} timed out") from None
    except FileNotFoundError as exc:  # cwd gone, or git missing
        raise GitError(f"git {_verb(args)}: {exc.strerror}: {exc.filename}") from None
    if check and proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace").strip()
        raise GitError(f"git {_verb(args)} failed: {message[-2000:]}")
    return proc.stdout


def _verb(args) -> str:
    return next((a for a in args if not a.startswith("-") and "=" not in a), "command")


def git(*args: str, cwd: str | Path | None = None, timeout: float | None = None, check: bool = True) -> str:
    """Run git outside any slot (clone, ls-remote, the results repositories) and return stdout;
    raise GitError with git's own message on failure. Commands on a slot use ``_slot_git``."""
    return _run(args, cwd=cwd, env=_env(), timeout=timeout, check=check).decode(errors="replace").strip()


# --- a slot's .git is hostile -------------------------------------------------------------------
def trusted_config_path(path: Path) -> Path:
    """The pool's copy of a slot's .git/config: next to the slot, outside what sandboxed code sees."""
    path = Path(path)
    return path.parent / f"{path.name}.git-config"


def secure_slot(path: Path) -> Path:
    """Undo whatever hostile code did to make git run a program in ``path``; return its git dir.

    Raises GitError when ``.git`` is not a real directory (the slot is then broken and re-cloned).
    """
    path = Path(path)
    gitdir = path / ".git"
    try:
        mode = os.lstat(gitdir).st_mode
    except OSError:
        raise GitError(f"{path} is not a git working copy") from None
    if not stat.S_ISDIR(mode):
        raise GitError(f"{path}/.git is not a directory (replaced by a link or a file)")
    for name in ("objects", "objects/info"):
        if (gitdir / name).is_symlink():
            raise GitError(f"{path}/.git/{name} is a symbolic link")
    for name in _REDIRECTING:
        _remove(gitdir / name)
    for name in _LEGACY_REMOTES:
        _remove(gitdir / name)
    trusted = trusted_config_path(path)
    try:
        content = trusted.read_bytes()
    except FileNotFoundError:
        content = MINIMAL_CONFIG.encode()
    if not _holds_exactly(gitdir / "config", content):
        _replace_file(gitdir / "config", content)
    return gitdir


def _remove(target: Path) -> None:
    """Remove whatever is at ``target`` (a link itself, never what it points to); one ``lstat``
    when there is nothing, as is usual."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(target, ignore_errors=True)
    else:
        target.unlink(missing_ok=True)


def unlock_folders(root: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Give the owner read, write and search on ``root`` and every folder under it (never through
    a link), but not into the top-level names in ``skip``.

    A task's commands may lock folders of their slot (``chmod 000`` on one, ``555`` on one holding
    a file): a runner that is not root then cannot list or empty them, so ``git clean`` and a
    removal fail and the slot is lost for good. Nothing of the task runs by then (the reset kills
    what is left in the slot first); the folders are the runner's own, so it may change their mode."""
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        try:
            mode = os.lstat(folder).st_mode
            if not stat.S_ISDIR(mode):
                continue
            if mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(folder, stat.S_IMODE(mode) | stat.S_IRWXU)
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False) and not (folder == Path(root) and entry.name in skip):
                        stack.append(Path(entry.path))
        except OSError:
            continue  # gone meanwhile, or not ours: the caller's retry says what is left


def remove_tree(target: Path) -> None:
    """Remove the folder ``target`` whole, even where a task's commands took the owner's
    permissions away from folders in it; raise OSError when something stays."""
    target = Path(target)
    try:
        shutil.rmtree(target)
    except FileNotFoundError:
        return
    except OSError:
        unlock_folders(target)
        shutil.rmtree(target)


def _clean_files(path: Path, clean_args: list[str]) -> None:
    """``git clean`` the working copy; if it fails, unlock the folders a task may have locked
    and clean once more (its error stands when that fails too)."""
    try:
        _slot_git(path, *clean_args)
    except GitError:
        unlock_folders(path, skip=(".git",))
        _slot_git(path, *clean_args)


def _holds_exactly(target: Path, content: bytes) -> bool:
    """``target`` is a regular file of its own (no link, no second name) whose bytes are ``content``.
    Opened without following a link and without blocking (a FIFO), read no further than
    ``content``'s length: what hostile code left there cannot stall or mislead the check."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size != len(content):
            return False
        return os.read(fd, len(content) + 1) == content
    finally:
        os.close(fd)


def _replace_file(target: Path, content: bytes) -> None:
    """Write ``content`` as a new file at ``target``: a symlink or hard link there is replaced,
    never written through."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".config-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _slot_env(path: Path, gitdir: Path) -> dict[str, str]:
    env = _env()
    env["GIT_DIR"] = str(gitdir)
    env["GIT_WORK_TREE"] = str(path)
    return env


def _slot_run(path: Path, args: tuple[str, ...], *, check: bool = True, stdin: bytes | None = None) -> bytes:
    path = Path(path)
    gitdir = secure_slot(path)
    return _run(args, cwd=path, env=_slot_env(path, gitdir), check=check, stdin=stdin)


def _slot_git(path: Path, *args: str, check: bool = True) -> str:
    """Run git on a slot, after ``secure_slot``; stdout as text."""
    return _slot_run(path, args, check=check).decode(errors="replace").strip()


# --- remotes ------------------------------------------------------------------------------------
def remote_head(url: str, *, field: str = "url") -> str:
    """The branch ``url``'s HEAD names ("" when it names none). The URL is checked first: nothing
    git could read as an option or a program-running transport reaches it."""
    url = _allowed_url(url, field=field)
    out = git("ls-remote", "--symref", "--", url, "HEAD", timeout=60)
    for line in out.splitlines():
        if line.startswith("ref: refs/heads/"):
            return line.split("refs/heads/", 1)[1].split()[0]
    return ""


def clone(url: str, dest: Path) -> None:
    """Clone ``url`` into ``dest`` (no checkout) and keep the pool's copy of its config."""
    url = _allowed_url(url)
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        if dest.is_symlink() or not dest.is_dir():
            dest.unlink()
        else:
            remove_tree(dest)
    trusted = trusted_config_path(dest)
    trusted.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # --dissociate: a local source's alternates would be copied in, and secure_slot removes them.
    git("clone", "--quiet", "--no-checkout", "--dissociate", "--", url, str(dest))
    # Nothing hostile has run in the slot yet: the config git clone wrote is the trusted one.
    _replace_file(trusted, (dest / ".git" / "config").read_bytes())
    # Every object in one pack with a reachability bitmap: a clone of a local path copies loose
    # objects (each read is a file to open and inflate), and the prune of every reset walks
    # everything reachable, which a bitmap answers without reading the trees. Once per clone.
    _slot_git(dest, "repack", "-a", "-d", "-b", "-q")


def _check_ref(ref: str) -> None:
    """A ref from a task goes on git's command line: refuse what git could read as an option."""
    if not ref or ref.startswith("-") or any(c.isspace() or ord(c) < 32 or c in "\\:~^?*[" for c in ref):
        raise RefNotFound(f"{ref!r} is not a valid branch, tag or commit name")


def resolve(path: Path, ref: str) -> str | None:
    """The commit ``ref`` names in this working copy (a branch of origin counts), or None."""
    _check_ref(ref)
    for candidate in (f"refs/remotes/origin/{ref}", ref):
        out = _slot_git(
            path, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{candidate}^{{commit}}", check=False
        )
        if out:
            return out
    return None


def fetch(path: Path, url: str, ref: str | None = None) -> None:
    """Fetch ``ref`` (every branch when None) from ``url`` into refs/remotes/origin/.

    The URL comes from the caller (the Repository row), never from the slot's own config."""
    url = _allowed_url(url)
    if ref:
        _check_ref(ref)
        refspec = ref if _looks_like_sha(ref) else f"+{ref}:refs/remotes/origin/{ref}"
        # No --prune: with a short name on the left of the refspec, git takes the tracking ref it
        # just matched for stale and deletes it, every other fetch, and the ref is then fetched again.
        _slot_git(path, "fetch", "--quiet", "--no-recurse-submodules", "--", url, refspec)
        return
    refspec = "+refs/heads/*:refs/remotes/origin/*"
    _slot_git(path, "fetch", "--quiet", "--prune", "--no-recurse-submodules", "--", url, refspec)


def _looks_like_sha(ref: str) -> bool:
    return 7 <= len(ref) <= 64 and all(c in "0123456789abcdef" for c in ref.lower())


def resolve_or_fetch(path: Path, ref: str, *, url: str, refresh: bool = False) -> str:
    """The commit for ``ref``. A commit id present locally is used as is; with ``refresh`` a
    branch or tag is fetched from ``url`` first so it names origin's latest (kept local if origin
    is down)."""
    _check_ref(ref)
    if refresh and not _looks_like_sha(ref):
        try:
            fetch(path, url, ref)
        except GitError:
            pass  # origin unreachable or not a branch: fall back to what we have
    commit = resolve(path, ref)
    if commit is None:
        try:
            fetch(path, url, ref)
        except GitError:
            try:
                fetch(path, url)
            except GitError as exc:
                raise RefNotFound(f"ref {ref!r} not found, and fetching failed: {exc.message}") from None
        commit = resolve(path, ref)
    if commit is None:
        raise RefNotFound(f"ref {ref!r} not found in the repository")
    return commit


def checkout_detached(path: Path, commit: str) -> None:
    _slot_git(path, "checkout", "--quiet", "--force", "--detach", commit)


def clear_operation_state(path: Path) -> None:
    """Remove what a killed git or an abandoned merge/rebase leaves in .git."""
    gitdir = path / ".git"
    for name in (
        "index.lock",
        "HEAD.lock",
        "MERGE_HEAD",
        "CHERRY_PICK_HEAD",
        "REVERT_HEAD",
        "REBASE_HEAD",
        "ORIG_HEAD",
        # The last commit message and fetched refs of the previous task, for the next to read.
        "COMMIT_EDITMSG",
        "FETCH_HEAD",
    ):
        (gitdir / name).unlink(missing_ok=True)
    for name in ("rebase-merge", "rebase-apply"):
        shutil.rmtree(gitdir / name, ignore_errors=True)


def reset_clean(path: Path, commit: str, keep_paths: list[str]) -> None:
    """Make the working copy exactly ``commit``: tracked files restored, untracked and ignored
    files removed except ``keep_paths``, every local branch and stash deleted, HEAD detached,
    and nothing of the previous task left in ``.git`` (reflogs, its commits and blobs)."""
    # Nothing a command left running (unsandboxed, or its runner killed mid-command) may write
    # into the slot after the reset, for the next task to commit.
    kill_processes_in(path)
    secure_slot(path)  # raises when .git is not a real directory
    clear_operation_state(path)
    checkout_detached(path, commit)
    _empty_submodule_folders(path, keep_paths)
    clean_args = ["clean", "-ffdxq"]
    for keep in keep_paths:
        clean_args += ["-e", keep.strip("/")]
    # The files' clean (a walk of the working tree) runs beside the history's: the two touch
    # different things (clean only reads the index; refs and objects are not its business).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="git-clean") as side:
        cleaning = side.submit(_clean_files, path, clean_args)
        try:
            _forget_history(path)
        finally:
            cleaning.result()


def _empty_submodule_folders(path: Path, keep_paths: list[str]) -> None:
    """Empty the folder of every submodule of the index (``commit``'s, after its checkout): a slot
    never checks one out, and ``git clean`` never enters one, so what a task's commands put there
    (files, a .git) would be left for the next task. A folder in a kept path, or holding one, is
    the setup's and stays."""
    kept = [keep.strip("/") for keep in keep_paths if keep.strip("/")]
    for name in _gitlinks(path):
        if any(name == keep or name.startswith(f"{keep}/") or keep.startswith(f"{name}/") for keep in kept):
            continue
        folder = _real_folder(path, name)  # (a link or a file there, the checkout made a folder again)
        if folder is None:
            continue
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries]
        for entry_name in names:
            _remove(folder / entry_name)
        with os.scandir(folder) as entries:
            if any(True for _ in entries):  # (a folder its owner may not enter): broken, never half-empty
                raise GitError(f"could not empty the submodule folder {name}")


def _forget_history(path: Path) -> None:
    """Delete every local branch and stash, every reflog and every object nothing else names."""
    refs = _slot_git(path, "for-each-ref", "--format=%(refname)", "refs/heads/", "refs/stash")
    if refs:
        # One process deletes them all; refs created by the agent never survive a reset.
        stdin = "".join(f"delete {ref}\n" for ref in refs.splitlines())
        _slot_run(path, ("update-ref", "--stdin"), stdin=stdin.encode())
    # Slots are shared between users, and the next task's commands read .git (read-only): the
    # previous task's commits and file contents, and the reflog naming them, must go with it.
    # Every reflog goes whole (what ``reflog expire --expire=now --all`` leaves is empty logs),
    # removed here rather than by one more git process; a link there is removed, never followed.
    _remove(path / ".git" / "logs")
    _slot_git(path, "prune", "--expire=now")


def head(path: Path) -> str:
    return _slot_git(path, "rev-parse", "HEAD")


# --- operations the runner performs on a leased working copy -------------------------------------
def create_branch(path: Path, branch: str) -> None:
    """Point ``branch`` at HEAD's commit and check it out (``git checkout -B branch`` without its
    pass over every file: the index and the files stay as they are)."""
    ref = f"refs/heads/{branch}"
    _slot_git(path, "update-ref", "-m", "branch: Created from HEAD", ref, "HEAD")
    _slot_git(path, "symbolic-ref", "-m", f"checkout: moving to {branch}", "HEAD", ref)


def _gitlinks(path: Path, *, env: dict[str, str] | None = None) -> list[str]:
    """The paths the index holds as submodules (gitlinks), relative to the slot. ``env``: run
    with that environment (another index) instead of the slot's own."""
    path = Path(path)
    index = Path(env["GIT_INDEX_FILE"]) if env is not None else path / ".git" / "index"
    if not _may_hold_gitlinks(index):
        return []
    if env is None:
        out = _slot_run(path, ("ls-files", "--stage", "-z"))
    else:
        out = _run(("ls-files", "--stage", "-z"), cwd=path, env=env)
    return [os.fsdecode(entry.split(b"\t", 1)[1]) for entry in out.split(b"\0") if entry.startswith(b"160000 ")]


# A submodule's index entry has the mode 160000 (octal), stored as four big-endian bytes.
_GITLINK_MODE = (0o160000).to_bytes(4, "big")


def _may_hold_gitlinks(index: Path) -> bool:
    """False when the index file surely holds no submodule: no entry's mode can be 160000 where
    its four bytes appear nowhere in the file (the usual repository, answered without a git
    process). True when they appear anywhere (a submodule, or the bytes by chance in a hash or a
    size), or the file cannot be read: then ``ls-files`` says. (Every entry is in this one file: a
    slot's config never turns on git's split index.)"""
    try:
        fd = os.open(index, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # no index: no entries
    except OSError:
        return True
    try:
        with os.fdopen(fd, "rb") as source:
            return _GITLINK_MODE in source.read()
    except OSError:
        return True


def _real_folder(path: Path, name: str) -> Path | None:
    """``path / name`` when every step of it is a real folder (no link, nothing missing)."""
    folder = Path(path)
    for part in Path(name).parts:
        if part in ("", ".", "..") or os.path.normcase(part) == ".git":
            return None
        folder = folder / part
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                return None
        except OSError:
            return None
    return folder


def _unpopulate_submodules(path: Path, *, index: dict[str, str] | None = None) -> None:
    """Remove the ``.git`` (folder, file or link) of every submodule's folder in the working copy.

    A slot never checks submodules out, so whatever is there was put by the task's commands (the
    box keeps only the slot's own .git read-only). ``git add --all`` looks into each populated
    submodule with a ``git status`` that reads that .git, its config and attributes: a clean
    filter there would be a program git runs on this host, outside the box. Without its .git the
    folder is an empty submodule to git, which then never looks inside; the files stay."""
    for name in _gitlinks(path, env=index):
        folder = _real_folder(path, name)
        if folder is not None:
            _remove(folder / ".git")


# ``git add`` writes a file larger than core.bigFileThreshold (512 MiB unless set) straight into a
# pack of its own, and ``prune`` at the reset removes loose objects only: that file's content would
# stay in .git, for the next task's commands to read. Every object a task's add writes stays loose.
_ADD = ["-c", "core.bigFileThreshold=1024g"]


def _excluding_kept(keep_paths: list[str]) -> list[str]:
    """Config that makes git treat the kept paths (a slot's .venv, node_modules) as ignored.

    An exclude file rather than ``:(exclude)`` pathspecs: git add fails outright when such a
    pathspec names a path the project's own .gitignore ignores too (the usual case for .venv).
    The file lives outside the slot, so nothing in the working copy can change it."""
    if not keep_paths:
        return []
    patterns = "".join(f"/{p.strip('/')}\n" for p in sorted(set(keep_paths)))
    folder = config.current().tmp_root
    folder.mkdir(parents=True, exist_ok=True)
    exclude = folder / f"git-keep-{hashlib.sha256(patterns.encode()).hexdigest()[:16]}.exclude"
    if not exclude.exists():
        # A temporary name of its own: runner threads of one process may write it at once.
        fd, temp = tempfile.mkstemp(dir=folder, prefix=".git-keep-")
        with os.fdopen(fd, "w") as out:
            out.write(patterns)
        os.replace(temp, exclude)
    return ["-c", f"core.excludesFile={exclude}"]


def has_changes(path: Path, keep_paths: list[str]) -> bool:
    """Whether ``git status`` shows anything (the keep paths and what the project ignores never count).

    Untracked folders are listed as folders (``-unormal``: one with any file ``-uall`` would list
    shows up, one holding only ignored files does not), so git stops at the first level of each.
    Never git's untracked cache: it keeps the names of untracked files in the index, and a reset
    (checkout, clean) leaves the names of files a task deleted itself there, for the next task's
    commands to read in .git."""
    # A changed tracked file is the usual answer, and ``diff`` finds it without walking every
    # folder for untracked files; only when it finds none does ``status`` look further.
    # ``--ignore-submodules=dirty``: a submodule counts only when its commit moved. Its content is
    # never looked at: that takes a ``git status`` inside the submodule's folder, which reads the
    # .git a task may have put there (a clean filter there is a program git runs, out of the box).
    if _slot_git(path, "diff", "--name-only", "--no-renames", "--no-ext-diff", "--ignore-submodules=dirty"):
        return True
    status = ["-c", "core.untrackedCache=false", "status", "--porcelain", "--untracked-files=normal"]
    return bool(_slot_git(path, *_excluding_kept(keep_paths), *status, "--ignore-submodules=dirty"))


def commit_all(path: Path, message: str, *, author_name: str, author_email: str, keep_paths: list[str]) -> str:
    """Stage every change as ``git status`` shows it (never the keep paths, nor what the
    project ignores) and commit it on the checked-out branch; returns the commit id.

    What ``git commit -m`` does, in plumbing: the files are scanned once (``add``), not again by
    commit's own index refresh. The message is cleaned as ``git commit -m`` cleans it, and a
    tree equal to HEAD's is refused as commit refuses it ("nothing to commit")."""
    _unpopulate_submodules(path)
    _slot_git(path, *_excluding_kept(keep_paths), *_ADD, "add", "--all")
    tree = _slot_git(path, "write-tree")
    parent, parent_tree = _slot_git(path, "rev-parse", "HEAD", "HEAD^{tree}").split()
    if tree == parent_tree:
        raise GitError("git commit failed: nothing to commit, working tree clean")
    cleaned = clean_message(message)
    if not cleaned:
        raise GitError("git commit failed: empty commit message")
    identity = ["-c", f"user.name={author_name}", "-c", f"user.email={author_email}"]
    commit = _slot_git(path, *identity, "commit-tree", tree, "-p", parent, "-m", cleaned)
    subject = cleaned.split("\n", 1)[0]
    # Moves the branch HEAD names, only from ``parent`` (git's compare-and-swap), as commit does.
    _slot_git(path, "update-ref", "-m", f"commit: {subject}", "HEAD", commit, parent)
    return commit


def clean_message(message: str) -> str:
    """``message`` as ``git commit -m`` stores it (``git stripspace``: trailing whitespace cut from
    every line, runs of blank lines made one, none at the start or end, a final newline)."""
    lines: list[str] = []
    blank = False
    for line in message.split("\n"):
        line = line.rstrip(" \t\n\r")  # what git counts as space (not \v, \f)
        if not line:
            blank = bool(lines)
            continue
        if blank:
            lines.append("")
            blank = False
        lines.append(line)
    return "".join(f"{line}\n" for line in lines)


def changed_files(path: Path, base: str) -> list[str]:
    out = _slot_git(path, "diff", "--no-ext-diff", "--no-textconv", "--name-only", base, "HEAD", "--")
    return [line for line in out.splitlines() if line]


def format_patch(path: Path, base: str, output: Path) -> None:
    """The change against ``base`` as ``git format-patch`` mail, which ``git am`` applies."""
    data = _slot_run(path, ("format-patch", "--no-ext-diff", "--no-textconv", "--stdout", "--binary", f"{base}..HEAD"))
    output.write_bytes(data)


# A results repository of ours keeps a branch per task (``agent/...``), and git's push cost grew
# with them (receive-pack shows every ref and its connectivity check walks from all of them, twice
# with the quarantine's alternate refs: ~200 ms a push at 50,000 branches, against ~22). The branches
# are hidden from pushes: a push lands on a staging ref beside the shared base, and the branch is set
# by ``update-ref`` in the repository itself. Fetching them (upload-pack) is not affected.
RESULT_BRANCHES = "refs/heads/agent/"
STAGING_REFS = "refs/agentrunner/incoming/"
_RESULTS_CONFIG = (("receive.hideRefs", RESULT_BRANCHES), ("core.alternateRefsPrefixes", "refs/agentrunner/base"))


def ensure_bare(path: Path) -> None:
    """Make ``path`` a results repository of ours (a bare repository, configured as above) unless
    it is one already (then nothing runs: its config file is read)."""
    path = Path(path)
    if not (path / "HEAD").exists():
        path.mkdir(parents=True, exist_ok=True)
        git("init", "--quiet", "--bare", "--", str(path))
    try:
        text = (path / "config").read_text(errors="replace")
    except OSError:
        text = ""
    if f"hideRefs = {RESULT_BRANCHES}" not in text:  # as git config writes it: one repository at a time
        for key, value in _RESULTS_CONFIG:
            git("config", key, value, cwd=path)


def push(path: Path, remote: str, branch: str, *, base: str = "") -> None:
    """Push HEAD to ``branch`` of ``remote``: a push_url (checked again here) or a results
    repository of ours (a path in the results folder: through a staging ref, see ``ensure_bare``).

    With ``base`` (for a results repository of ours, never a user's push_url) the task's base
    commit is kept there too, as ``refs/agentrunner/base``: git sends what the remote lacks
    judging by the remote's refs the pusher has, and a reset prunes earlier tasks' commits from
    the slot, so without a ref to the shared history every push would send all of it."""
    results_root = config.current().results_root
    remote = _allowed_url(remote, field="push_url", extra_roots=tuple(r for r in (results_root,) if r))
    if not _is_results_repository(remote, results_root):
        _slot_git(path, "push", "--quiet", "--force", "--no-verify", "--", remote, f"HEAD:refs/heads/{branch}")
        return
    # Ours (ensure_bare): the branch is hidden from pushes, so the commit lands on a staging ref of
    # its own and the branch is set from it, the staging ref dropped, in one ref transaction there.
    staging = f"{STAGING_REFS}{uuid.uuid4().hex}"
    pushed = False
    if base:
        try:
            _slot_git(
                path, "push", "--quiet", "--force", "--no-verify", "--", remote,
                f"HEAD:{staging}", f"+{base}:refs/agentrunner/base",
            )  # fmt: skip
            pushed = True
        except GitError:
            # Another runner updating the base ref at the same moment holds its lock ("cannot
            # lock ref"): the base is an optimisation, the branch is the result. Push it alone.
            pass
    if not pushed:
        _slot_git(path, "push", "--quiet", "--force", "--no-verify", "--", remote, f"HEAD:{staging}")
    _run(
        ("update-ref", "--stdin"), cwd=remote, env=_env(),
        stdin=f"update refs/heads/{branch} {staging}\ndelete {staging}\n".encode(),
    )  # fmt: skip


def _is_results_repository(remote: str, results_root: Path | None) -> bool:
    """Is ``remote`` a local path inside our results folder (a repository ``ensure_bare`` made)?"""
    if not results_root or "://" in remote or remote.startswith("file:"):
        return False
    try:
        return Path(remote).resolve().is_relative_to(Path(results_root).resolve())
    except (OSError, ValueError):
        return False


def bundle_create(path: Path, output: Path, branch: str, *, base: str = "") -> None:
    """Write ``branch`` of the working copy (the commits after ``base`` when given) to ``output``
    as a git bundle: how a runner host without push access hands its result to the server."""
    _check_ref(branch)
    revs = [f"refs/heads/{branch}"]
    if base:
        _check_ref(base)
        revs.append(f"^{base}")
    _slot_git(path, "bundle", "create", "--quiet", str(output), *revs)


def content_tree(path: Path, keep_paths: list[str]) -> str:
    """The tree id of the working copy's content as ``commit_all`` would stage it (kept and
    ignored paths left out), computed in a temporary index: the slot's own index is untouched.

    Two equal ids mean the same files with the same content and modes, so a test run on one
    stands for a run on the other."""
    path = Path(path)
    gitdir = secure_slot(path)
    folder = config.current().tmp_root
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix="index-") as scratch:
        index = Path(scratch) / "index"
        env = {**_slot_env(path, gitdir), "GIT_INDEX_FILE": str(index)}
        own = gitdir / "index"
        if own.is_file() and not own.is_symlink():
            shutil.copyfile(own, index)  # its stat cache spares hashing every unchanged file
        else:
            _run(("read-tree", "HEAD"), cwd=path, env=env)
        _unpopulate_submodules(path, index=env)
        _run((*_excluding_kept(keep_paths), *_ADD, "add", "--all"), cwd=path, env=env)
        return _run(("write-tree",), cwd=path, env=env).decode().strip()
