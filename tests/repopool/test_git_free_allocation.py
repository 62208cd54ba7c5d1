"""A slot reset clean at the wanted commit, fetched within the TTL, is handed out without a single
git process: the bookkeeping (slot.commit, base_commit, fetched_at) decides. Counted with a `git`
on PATH that logs each run before running the real one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from repopool import services
from repopool.models import Slot
from tests.conftest import run_git, write_files

pytestmark = pytest.mark.django_db


def test_a_clean_slot_at_the_wanted_commit_needs_no_git(repository, settings, git_runs):
    settings.REPO_POOL_FETCH_TTL = 3600
    first = services.slot_allocate(repository=repository, holder="a")
    assert len(git_runs()) > 0  # the clone (the shim counts)
    services.slot_release(slot_id=first.slot_id, lease_token=first.lease_token)

    before = len(git_runs())
    again = services.slot_allocate(repository=repository, holder="b")
    assert len(git_runs()) == before  # the default branch, the slot at its base, fetched moments ago
    assert again.slot_id == first.slot_id and again.commit == first.commit
    assert run_git(again.path, "rev-parse", "HEAD") == first.commit
    services.slot_release(slot_id=again.slot_id, lease_token=again.lease_token)

    before = len(git_runs())
    by_commit = services.slot_allocate(repository=repository, holder="c", ref=first.commit)
    assert len(git_runs()) == before and by_commit.commit == first.commit
    services.slot_release(slot_id=by_commit.slot_id, lease_token=by_commit.lease_token)

    # Past the TTL the branch may have moved: git fetches, and the newer commit is what a reset
    # returns to from then on.
    origin = Path(repository.url)
    write_files(origin, {"calc.py": "def add(a, b):\n    return a + b\n"})
    run_git(origin, "commit", "-qam", "fix")
    newer = run_git(origin, "rev-parse", "HEAD")
    settings.REPO_POOL_FETCH_TTL = 0
    before = len(git_runs())
    moved = services.slot_allocate(repository=repository, holder="d")
    assert len(git_runs()) > before and moved.commit == newer
    services.slot_release(slot_id=moved.slot_id, lease_token=moved.lease_token)
    slot = Slot.objects.get(pk=moved.slot_id)
    assert slot.commit == slot.base_commit == newer
    assert run_git(moved.path, "rev-parse", "HEAD") == newer


def test_a_replaced_git_dir_still_breaks_the_slot_on_the_git_free_path(repository, settings, git_runs, tmp_path):
    settings.REPO_POOL_FETCH_TTL = 3600
    first = services.slot_allocate(repository=repository, holder="a")
    services.slot_release(slot_id=first.slot_id, lease_token=first.lease_token)
    shutil.move(first.path / ".git", tmp_path / "moved-gitdir")
    (first.path / ".git").symlink_to(tmp_path / "moved-gitdir")
    other = services.slot_allocate(repository=repository, holder="b")
    assert other.slot_id != first.slot_id
    broken = Slot.objects.get(pk=first.slot_id)
    assert broken.state == "broken" and "not a directory" in broken.last_error
