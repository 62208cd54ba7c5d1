"""Giving a slot back in two steps (the runner stores its artifacts meanwhile): the slot is
``resetting`` at once, fenced by the token; the copy is reset in the background; the wait frees
it clean (tracked files restored, untracked and ignored files, branches and the task's objects
gone), or broken when the reset failed."""

from __future__ import annotations

import subprocess

import pytest

from agentrunner.runner.ports import Ports
from common.outcomes import LeaseLost
from repopool import services as pool
from repopool.models import Slot
from tests.conftest import run_git, write_files
from workcopy import git

pytestmark = pytest.mark.django_db


@pytest.fixture
def repo(make_repo):
    origin = make_repo({"calc.py": "x = 1\n", "pkg/mod.py": "y = 2\n", ".gitignore": "build/\n"})
    return pool.repository_create(name="sample", url=str(origin), pool_size=1, keep_paths=[".venv"])


def test_the_slot_is_reset_in_the_background_and_freed_clean_by_the_wait(repo):
    ports = Ports.local()
    lease = pool.slot_allocate(repository=repo, holder="h", ref="main")
    path = lease.path
    git.create_branch(path, "agent/x")
    write_files(path, {"calc.py": "changed\n", "new.py": "n\n"})
    commit = git.commit_all(path, "task", author_name="a", author_email="a@example.com", keep_paths=[".venv"])
    write_files(path, {"build/out.o": "o", "stray.txt": "s", "pkg/mod.py": "changed too\n", ".venv/kept": "k"})

    wait = ports.pool.release_start(slot_id=lease.slot_id, token=lease.lease_token)
    assert Slot.objects.get(pk=lease.slot_id).state in ("resetting", "free")  # no longer leased
    with pytest.raises(LeaseLost):  # the token is spent at once
        ports.pool.renew(slot_id=lease.slot_id, token=lease.lease_token, lease_seconds=60)
    wait()

    slot = Slot.objects.get(pk=lease.slot_id)
    assert slot.state == "free" and slot.commit == lease.commit
    assert run_git(path, "status", "--porcelain", "--ignored") == "?? .venv/"  # only the kept path is left
    assert (path / "calc.py").read_text() == "x = 1\n" and (path / "pkg/mod.py").read_text() == "y = 2\n"
    assert run_git(path, "for-each-ref", "refs/heads/") == ""
    assert subprocess.run(["git", "cat-file", "-e", commit], cwd=path).returncode != 0


def test_a_reset_that_fails_leaves_the_slot_broken(repo, tmp_path):
    ports = Ports.local()
    lease = pool.slot_allocate(repository=repo, holder="h", ref="main")
    (lease.path / ".git").rename(tmp_path / "gitdir")
    (lease.path / ".git").write_text(f"gitdir: {tmp_path / 'gitdir'}\n")
    ports.pool.release_start(slot_id=lease.slot_id, token=lease.lease_token)()
    slot = Slot.objects.get(pk=lease.slot_id)
    assert slot.state == "broken" and "not a directory" in slot.last_error


def test_a_stale_token_is_refused_before_anything_is_reset(repo):
    ports = Ports.local()
    lease = pool.slot_allocate(repository=repo, holder="h", ref="main")
    (lease.path / "stray.txt").write_text("s")
    with pytest.raises(LeaseLost):
        ports.pool.release_start(slot_id=lease.slot_id, token="00000000-0000-0000-0000-000000000000")
    assert (lease.path / "stray.txt").exists() and Slot.objects.get(pk=lease.slot_id).state == "leased"
