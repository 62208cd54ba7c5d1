"""The git seam: every git command the pool runs goes through here (real git, as a subprocess)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from django.conf import settings

from common.errors import DomainError

# Never prompt for credentials, never run hooks or pagers, never pick up the user's config.
GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "/bin/true",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_PAGER": "cat",
    "LC_ALL": "C",
}
BASE_CONFIG = ["-c", "core.hooksPath=/dev/null", "-c", "advice.detachedHead=false", "-c", "gc.auto=0"]


class GitError(DomainError):
    code = "git_error"


class RefNotFound(GitError):
    code = "ref_not_found"
    field = "ref"


def _env() -> dict[str, str]:
    env = {name: os.environ[name] for name in ("PATH", "HOME", "TMPDIR", "SSH_AUTH_SOCK") if name in os.environ}
    env.update(GIT_ENV)
    return env


def git(*args: str, cwd: str | Path | None = None, timeout: float | None = None, check: bool = True) -> str:
    """Run git and return its stdout; raise GitError with git's own message on failure."""
    try:
        proc = subprocess.run(
            ["git", *BASE_CONFIG, *args],
            cwd=str(cwd) if cwd else None,
            env=_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout or settings.REPO_POOL_GIT_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} timed out") from None
    except FileNotFoundError as exc:  # cwd gone, or git missing
        raise GitError(f"git {args[0]}: {exc.strerror}: {exc.filename}") from None
    if check and proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace").strip()
        raise GitError(f"git {args[0]} failed: {message[-2000:]}")
    return proc.stdout.decode(errors="replace").strip()


def clone(url: str, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "--quiet", "--no-checkout", url, str(dest))


def resolve(path: Path, ref: str) -> str | None:
    """The commit ``ref`` names in this working copy (a branch of origin counts), or None."""
    for candidate in (f"refs/remotes/origin/{ref}", ref):
        try:
            return git("rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}", cwd=path)
        except GitError:
            continue
    return None


def fetch(path: Path, ref: str | None = None) -> None:
    args = ["fetch", "--quiet", "--prune", "origin"]
    if ref:
        args.append(f"+{ref}:refs/remotes/origin/{ref}" if not _looks_like_sha(ref) else ref)
    git(*args, cwd=path)


def _looks_like_sha(ref: str) -> bool:
    return 7 <= len(ref) <= 64 and all(c in "0123456789abcdef" for c in ref.lower())


def resolve_or_fetch(path: Path, ref: str, *, refresh: bool = False) -> str:
    """The commit for ``ref``. A commit id present locally is used as is; with ``refresh`` a
    branch or tag is fetched first so it names origin's latest (kept local if origin is down)."""
    if refresh and not _looks_like_sha(ref):
        try:
            fetch(path, ref)
        except GitError:
            pass  # origin unreachable or not a branch: fall back to what we have
    commit = resolve(path, ref)
    if commit is None:
        try:
            fetch(path, ref)
        except GitError:
            try:
                fetch(path)
            except GitError as exc:
                raise RefNotFound(f"ref {ref!r} not found, and fetching failed: {exc.message}") from None
        commit = resolve(path, ref)
    if commit is None:
        raise RefNotFound(f"ref {ref!r} not found in the repository")
    return commit


def checkout_detached(path: Path, commit: str) -> None:
    git("checkout", "--quiet", "--force", "--detach", commit, cwd=path)


def clear_operation_state(path: Path) -> None:
    """Remove what a killed git or an abandoned merge/rebase leaves in .git."""
    gitdir = path / ".git"
    for name in ("index.lock", "HEAD.lock", "MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD", "REBASE_HEAD"):
        (gitdir / name).unlink(missing_ok=True)
    for name in ("rebase-merge", "rebase-apply"):
        shutil.rmtree(gitdir / name, ignore_errors=True)


def reset_clean(path: Path, commit: str, keep_paths: list[str]) -> None:
    """Make the working copy exactly ``commit``: tracked files restored, untracked and ignored
    files removed except ``keep_paths``, every local branch and stash deleted, HEAD detached."""
    if not (path / ".git").is_dir():
        raise GitError(f"{path} is not a git working copy")
    clear_operation_state(path)
    checkout_detached(path, commit)
    clean_args = ["clean", "-ffdxq"]
    for keep in keep_paths:
        clean_args += ["-e", keep.strip("/")]
    git(*clean_args, cwd=path)
    refs = git("for-each-ref", "--format=%(refname)", "refs/heads/", "refs/stash", cwd=path)
    if refs:
        # One process deletes them all; refs created by the agent never survive a reset.
        stdin = "".join(f"delete {ref}\n" for ref in refs.splitlines())
        subprocess.run(
            ["git", *BASE_CONFIG, "update-ref", "--stdin"],
            cwd=str(path),
            env=_env(),
            input=stdin.encode(),
            capture_output=True,
            check=True,
            timeout=settings.REPO_POOL_GIT_TIMEOUT,
        )


def head(path: Path) -> str:
    return git("rev-parse", "HEAD", cwd=path)


# --- operations the runner performs on a leased working copy -------------------------------------
def create_branch(path: Path, branch: str) -> None:
    git("checkout", "--quiet", "-B", branch, cwd=path)


def _excluding_kept(keep_paths: list[str]) -> list[str]:
    """Config that makes git treat the kept paths (a slot's .venv, node_modules) as ignored.

    An exclude file rather than ``:(exclude)`` pathspecs: git add fails outright when such a
    pathspec names a path the project's own .gitignore ignores too (the usual case for .venv).
    The file lives outside the slot, so nothing in the working copy can change it."""
    if not keep_paths:
        return []
    patterns = "".join(f"/{p.strip('/')}\n" for p in sorted(set(keep_paths)))
    folder = Path(settings.TMP_ROOT)
    folder.mkdir(parents=True, exist_ok=True)
    exclude = folder / f"git-keep-{hashlib.sha256(patterns.encode()).hexdigest()[:16]}.exclude"
    if not exclude.exists():
        temp = exclude.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(patterns)
        temp.replace(exclude)
    return ["-c", f"core.excludesFile={exclude}"]


def has_changes(path: Path, keep_paths: list[str]) -> bool:
    return bool(git(*_excluding_kept(keep_paths), "status", "--porcelain", "--untracked-files=all", cwd=path))


def commit_all(path: Path, message: str, *, author_name: str, author_email: str, keep_paths: list[str]) -> str:
    """Stage every change as ``git status`` shows it (never the keep paths, nor what the
    project ignores) and commit it."""
    git(*_excluding_kept(keep_paths), "add", "--all", cwd=path)
    identity = ["-c", f"user.name={author_name}", "-c", f"user.email={author_email}"]
    git(*identity, "commit", "--quiet", "--no-verify", "-m", message, cwd=path)
    return head(path)


def changed_files(path: Path, base: str) -> list[str]:
    out = git("diff", "--name-only", base, "HEAD", cwd=path)
    return [line for line in out.splitlines() if line]


def format_patch(path: Path, base: str, output: Path) -> None:
    """The change against ``base`` as ``git format-patch`` mail, which ``git am`` applies."""
    data = git_bytes("format-patch", "--stdout", "--binary", f"{base}..HEAD", cwd=path)
    output.write_bytes(data)


def git_bytes(*args: str, cwd: Path) -> bytes:
    proc = subprocess.run(
        ["git", *BASE_CONFIG, *args],
        cwd=str(cwd),
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=settings.REPO_POOL_GIT_TIMEOUT,
    )
    if proc.returncode != 0:
        raise GitError(f"git {args[0]} failed: {proc.stderr.decode(errors='replace').strip()[-2000:]}")
    return proc.stdout


def ensure_bare(path: Path) -> None:
    if not (path / "HEAD").exists():
        path.mkdir(parents=True, exist_ok=True)
        git("init", "--quiet", "--bare", str(path))


def push(path: Path, remote: str, branch: str) -> None:
    git("push", "--quiet", "--force", remote, f"HEAD:refs/heads/{branch}", cwd=path)
