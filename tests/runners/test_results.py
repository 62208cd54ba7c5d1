"""Results bundles: a remote runner's result branch reaches the server's results repository."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from registry import services as registry
from tests.conftest import run_git
from tests.runners.conftest import API, claim

pytestmark = pytest.mark.django_db


def _work_copy(tmp_path: Path, origin: str, name: str = "work") -> Path:
    path = tmp_path / name
    run_git(tmp_path, "clone", "-q", origin, str(path))
    return path


def _bundle(work: Path, branch: str, base: str, *extra_refs: str) -> bytes:
    out = work.parent / f"{branch.replace('/', '_')}.bundle"
    run_git(work, "bundle", "create", "-q", str(out), f"{base}..{branch}", *extra_refs)
    return out.read_bytes()


def _result_commit(work: Path, branch: str, text: str = "def add(a, b):\n    return a + b\n") -> tuple[str, str]:
    base = run_git(work, "rev-parse", "HEAD")
    run_git(work, "checkout", "-q", "-b", branch)
    (work / "calc.py").write_text(text)
    run_git(work, "commit", "-qam", "fix add")
    return base, run_git(work, "rev-parse", "HEAD")


def _upload(runner, claimed, body: bytes, branch: str, base: str, *, key: str = "", sha: str | None = None):
    headers = {
        "HTTP_X_LEASE_TOKEN": claimed.lease,
        "HTTP_X_RESULT_BRANCH": branch,
        "HTTP_X_RESULT_BASE": base,
        "HTTP_X_CONTENT_SHA256": sha or hashlib.sha256(body).hexdigest(),
        "HTTP_IDEMPOTENCY_KEY": key or hashlib.sha1(body + branch.encode()).hexdigest(),
    }
    return runner.client.generic(
        "POST",
        f"{API}/attempts/{claimed.attempt_id}/results/",
        body,
        content_type="application/x-git-bundle",
        **headers,
    )


def test_bundle_lands_in_results_repository(runner, claimed, repo, tmp_path, settings):
    work = _work_copy(tmp_path, repo.url)
    branch = f"agent/{claimed.task_id.hex[:8]}"
    base, commit = _result_commit(work, branch)
    body = _bundle(work, branch, base)

    # The results repository does not exist yet: the base comes from the repository's URL.
    response = _upload(runner, claimed, body, branch, base)
    assert response.status_code == 200, response.content
    results = Path(settings.RESULTS_ROOT) / "sample.git"
    assert response.json() == {"fetch": f"git fetch {results} {branch}", "commit": commit}
    assert run_git(results, "rev-parse", f"refs/heads/{branch}") == commit
    # The fetch hint works for a user's clone.
    check = _work_copy(tmp_path, repo.url, "check")
    run_git(check, "fetch", "-q", str(results), branch)
    assert run_git(check, "rev-parse", "FETCH_HEAD") == commit

    replay = _upload(runner, claimed, body, branch, base)
    assert replay.status_code == 200 and replay.json() == response.json() and replay["Idempotent-Replayed"]

    # A second task's bundle: the base is there now.
    other = registry.task_create(title="two", instructions="x", repository=repo)
    second = claim(runner, task_id=str(other.pk))
    work2 = _work_copy(tmp_path, repo.url, "work2")
    branch2 = f"agent/{other.pk.hex[:8]}"
    base2, commit2 = _result_commit(work2, branch2, "def add(a, b):\n    return b + a\n")
    assert _upload(runner, second, _bundle(work2, branch2, base2), branch2, base2).json()["commit"] == commit2


def test_bundles_refused(runner, claimed, repo, tmp_path, settings):
    work = _work_copy(tmp_path, repo.url)
    branch = f"agent/{claimed.task_id.hex[:8]}"
    base, _commit = _result_commit(work, branch)
    body = _bundle(work, branch, base)

    def refused(response, status, field=None):
        assert response.status_code == status, response.content
        if field:
            assert field in response.json()["errors"], response.json()

    # Another task's branch, a base that is no commit id, a bad checksum, not a bundle.
    refused(_upload(runner, claimed, body, "agent/00000000", base), 400, "X-Result-Branch")
    refused(_upload(runner, claimed, body, "main", base), 400, "X-Result-Branch")
    refused(_upload(runner, claimed, body, branch, "HEAD"), 400, "X-Result-Base")
    refused(_upload(runner, claimed, body, branch, base, sha="0" * 64), 400)
    refused(_upload(runner, claimed, b"not a bundle at all", branch, base), 400)
    # A bundle carrying more than the task's branch (another branch too).
    run_git(work, "checkout", "-q", "-b", "elsewhere")
    (work / "evil.txt").write_text("x")
    run_git(work, "add", "evil.txt")
    run_git(work, "commit", "-qm", "elsewhere")
    run_git(work, "checkout", "-q", branch)
    two = _bundle(work, branch, base, "elsewhere")
    assert b"refs/heads/elsewhere" in two
    refused(_upload(runner, claimed, two, branch, base), 400)
    # A base unknown to the repository's URL.
    refused(_upload(runner, claimed, body, branch, "1" * 40), 400, "X-Result-Base")
    settings.AGENTRUNNER_RESULTS_BUNDLE_MAX = 10
    refused(_upload(runner, claimed, body, branch, base), 413)
    results = Path(settings.RESULTS_ROOT) / "sample.git"
    refs = subprocess.run(["git", "for-each-ref", "refs/heads"], cwd=results, capture_output=True, text=True)
    assert refs.stdout == ""  # nothing was fetched by a refused upload
    missing = runner.client.generic(
        "POST", f"{API}/attempts/{claimed.attempt_id}/results/", body, content_type="application/x-git-bundle",
        HTTP_X_LEASE_TOKEN=claimed.lease, HTTP_IDEMPOTENCY_KEY="m",
    )  # fmt: skip
    refused(missing, 400, "X-Result-Branch")


def test_results_fenced(runner, claimed, repo, tmp_path):
    work = _work_copy(tmp_path, repo.url)
    branch = f"agent/{claimed.task_id.hex[:8]}"
    base, _commit = _result_commit(work, branch)
    body = _bundle(work, branch, base)
    claimed.lease = "00000000-0000-0000-0000-000000000000"
    response = _upload(runner, claimed, body, branch, base)
    assert response.status_code == 409 and response.json()["code"] == "lease_lost"
