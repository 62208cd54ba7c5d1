"""Results of remote runners: a git bundle uploaded to the server, fetched into the server's
results repository (``RESULTS_ROOT/<repository>.git``) with the pool's hardened git.

The bundle comes from a runner host, which runs hostile code: it is size-capped while it streams
to disk, checked against its sha256, verified by ``git bundle verify`` (its prerequisite, the
task's base commit, must be there: fetched from the repository's URL, never from the runner,
when the results repository lacks it), must carry exactly the task's own branch, and is fetched
with ``transfer.fsckObjects``. Git runs with the pool's config and environment (no hooks, no
helpers, allowed transports only)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings

from artifacts.errors import ArtifactTooLarge, ChecksumMismatch, IncompleteUpload
from common.errors import DomainError
from workcopy import git

SHA_RE = re.compile(r"\A[0-9a-f]{40}(?:[0-9a-f]{24})?\Z")
STAGING_PREFIX = git.STAGING_REFS  # the runner's pushes stage there too
FSCK = ("-c", "transfer.fsckObjects=true", "-c", "fetch.fsckObjects=true")


class BundleRefused(DomainError):
    code = "bundle_refused"


def results_repository(repository_name: str) -> Path:
    path = Path(settings.RESULTS_ROOT) / f"{repository_name}.git"
    git.ensure_bare(path)
    return path


def spool_bundle(chunks: Iterable[bytes], *, expected_sha256: str, expected_size: int, max_size: int) -> Path:
    """Write the bundle to a temporary file, hashing and counting; the caller removes it."""
    folder = Path(settings.TMP_ROOT)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="results-", suffix=".bundle", dir=folder)
    path = Path(name)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > max_size:
                    raise ArtifactTooLarge(f"the bundle exceeds the limit of {max_size} bytes")
                digest.update(chunk)
                out.write(chunk)
        if size != expected_size:
            raise IncompleteUpload(f"upload ended after {size} of {expected_size} bytes")
        if digest.hexdigest() != expected_sha256.lower():
            raise ChecksumMismatch(f"bundle sha256 is {digest.hexdigest()}, not {expected_sha256}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _ok(repo: Path, *args: str) -> bool:
    """Whether a git query succeeds (exit 0), with the pool's hardened config and environment."""
    proc = subprocess.run(
        ["git", *git.BASE_CONFIG, *args], cwd=repo, env=git._env(), capture_output=True,
        stdin=subprocess.DEVNULL, timeout=settings.REPO_POOL_GIT_TIMEOUT,
    )  # fmt: skip
    return proc.returncode == 0


def _has_commit(repo: Path, commit: str) -> bool:
    return _ok(repo, "cat-file", "-e", f"{commit}^{{commit}}")


def _ensure_base(repo: Path, base: str, origin_url: str, base_ref: str) -> None:
    """The base commit in the results repository, fetched from the repository's own URL if
    missing (by id, else the task's base ref, else every branch)."""
    if _has_commit(repo, base):
        return
    url = git._allowed_url(origin_url)
    for refspec in (base, f"+{base_ref}:refs/agentrunner/origin/{base_ref}", "+refs/heads/*:refs/agentrunner/origin/*"):
        if not refspec or refspec.endswith(":refs/agentrunner/origin/"):
            continue
        git.git("fetch", "--quiet", "--no-recurse-submodules", "--", url, refspec, cwd=repo, check=False)
        if _has_commit(repo, base):
            # Keep it reachable (a concurrent import may hold the ref's lock: the object stays anyway).
            git.git("update-ref", "refs/agentrunner/base", base, cwd=repo, check=False)
            return
    raise BundleRefused(f"the base commit {base} is not in the repository at its URL", field="X-Result-Base")


def import_bundle(
    *, repository_name: str, origin_url: str, base_ref: str, bundle: Path, branch: str, base: str
) -> tuple[str, str]:
    """Fetch ``branch`` from the bundle into a staging ref of the results repository; returns
    (its commit, which must descend from ``base``; the staging ref). The branch itself is set by
    ``publish_branch`` once the attempt's lease is checked again: the import can take long, and
    an attempt reaped meanwhile must not overwrite (or delete) the task's result branch."""
    repo = results_repository(repository_name)
    _ensure_base(repo, base, origin_url, base_ref)
    try:
        git.git("bundle", "verify", "--quiet", "--", str(bundle), cwd=repo)
        heads = git.git("bundle", "list-heads", "--", str(bundle), cwd=repo).splitlines()
    except git.GitError as exc:
        raise BundleRefused(f"not a usable git bundle: {exc.message[-500:]}") from None
    wanted = f"refs/heads/{branch}"
    refs = {line.split(" ", 1)[1] for line in heads if " " in line}
    if refs != {wanted}:
        raise BundleRefused(f"the bundle must hold exactly {wanted}, not {sorted(refs)[:5]}")
    staging = f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    try:
        git.git(*FSCK, "fetch", "--quiet", "--force", "--no-recurse-submodules", "--", str(bundle),
                f"+{wanted}:{staging}", cwd=repo)  # fmt: skip
    except git.GitError as exc:
        drop_staging(repository_name=repository_name, staging=staging)
        raise BundleRefused(f"the bundle could not be fetched: {exc.message[-500:]}") from None
    commit = git.git("rev-parse", "--verify", f"{staging}^{{commit}}", cwd=repo)
    if not _ok(repo, "merge-base", "--is-ancestor", base, commit):
        drop_staging(repository_name=repository_name, staging=staging)
        raise BundleRefused(f"{branch} does not descend from the base {base}", field="X-Result-Base")
    return commit, staging


def publish_branch(*, repository_name: str, branch: str, commit: str) -> None:
    """Point the result branch at ``commit`` (imported by ``import_bundle``)."""
    git.git("update-ref", f"refs/heads/{branch}", commit, cwd=results_repository(repository_name))


def drop_staging(*, repository_name: str, staging: str) -> None:
    git.git("update-ref", "-d", staging, cwd=results_repository(repository_name), check=False)
