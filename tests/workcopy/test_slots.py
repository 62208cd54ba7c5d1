"""Working copies without a database: prepare, reset, the per-slot lock."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.outcomes import RefNotFound, SlotBroken
from tests.conftest import run_git, write_files
from workcopy import config, git, slots


@pytest.fixture
def spec(make_repo):
    origin = make_repo()
    return slots.RepoSpec(name="sample", url=str(origin), default_branch="main", keep_paths=[".venv"])


@pytest.fixture(autouse=True)
def own_config(tmp_path):
    """The package runs on the settings it is given, none of Django's."""
    config.configure(config.Config(pool_root=tmp_path / "pool", tmp_root=tmp_path / "tmp", local_repo_roots=None))
    yield
    config.configure(None)


def test_prepare_clones_then_reuses_then_follows_the_ref(spec, tmp_path):
    path = slots.slot_dir("sample", 0)
    first = slots.prepare(spec, slots.SlotSeen(path=path), "", fetch_ttl=0)
    head = run_git(Path(spec.url), "rev-parse", "HEAD")
    assert first.commit == first.base_commit == head and first.fetched
    assert (path / "calc.py").exists() and run_git(path, "rev-parse", "HEAD") == head

    write_files(Path(spec.url), {"calc.py": "newer\n"})
    run_git(Path(spec.url), "commit", "-qam", "newer")
    newer = run_git(Path(spec.url), "rev-parse", "HEAD")
    seen = slots.SlotSeen(path=path, commit=head, base_commit=head, fetched_at=time.time())
    assert slots.prepare(spec, seen, "main", fetch_ttl=3600).commit == head  # fetched moments ago
    again = slots.prepare(spec, seen, "main", fetch_ttl=0)
    assert again.commit == again.base_commit == newer and again.fetched
    assert (path / "calc.py").read_text() == "newer\n"
    with pytest.raises(RefNotFound):
        slots.prepare(spec, seen, "no-such-branch", fetch_ttl=0)


def test_fetching_a_branch_that_did_not_move_keeps_it(spec):
    """One fetch a refresh: the fetched ref is there afterwards (git's --prune with a single refspec
    deleted it when it was up to date, and every allocation fetched twice)."""
    path = slots.slot_dir("sample", 0)
    made = slots.prepare(spec, slots.SlotSeen(path=path), "", fetch_ttl=0)
    slots.reset(spec, path, made.commit)
    git.fetch(path, spec.url, "main")
    assert run_git(path, "for-each-ref", "--format=%(objectname)", "refs/remotes/origin/main") == made.commit
    assert git.resolve(path, "main") == made.commit


def test_needs_reset_cleans_what_a_dead_holder_left(spec):
    path = slots.slot_dir("sample", 0)
    made = slots.prepare(spec, slots.SlotSeen(path=path), "", fetch_ttl=0)
    write_files(path, {"calc.py": "half-done\n", "stray.txt": "x\n", ".venv/kept": "kept\n"})
    run_git(path, "checkout", "-q", "-b", "agent/leftover")
    seen = slots.SlotSeen(
        path=path, commit=made.commit, base_commit=made.commit, needs_reset=True, fetched_at=time.time()
    )
    ready = slots.prepare(spec, seen, "", fetch_ttl=3600)
    assert ready.commit == made.commit
    assert not (path / "stray.txt").exists() and "a - b" in (path / "calc.py").read_text()
    assert (path / ".venv/kept").exists()  # keep paths survive a reset
    assert run_git(path, "for-each-ref", "refs/heads/") == ""


def test_a_missing_copy_the_server_counts_on_is_broken(spec):
    path = slots.slot_dir("sample", 0)
    with pytest.raises(SlotBroken, match="missing"):
        slots.prepare(spec, slots.SlotSeen(path=path, commit="a" * 40), "", fetch_ttl=0)


def test_a_failing_setup_breaks_the_slot(make_repo):
    bad = slots.RepoSpec(name="bad", url=str(make_repo()), default_branch="main", setup_command="exit 4")
    with pytest.raises(SlotBroken, match="exited with 4"):
        slots.prepare(bad, slots.SlotSeen(path=slots.slot_dir("bad", 0)), "", fetch_ttl=0)


def test_two_processes_never_work_in_one_copy(spec, tmp_path):
    """Another process holding the slot's lock (as a second runner on this host would) makes
    prepare wait until it lets go."""
    path = slots.slot_dir("sample", 0)
    made = slots.prepare(spec, slots.SlotSeen(path=path), "", fetch_ttl=0)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(path.parent / '0.lock')!r}, os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(1.5)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        finished = []
        seen = slots.SlotSeen(path=path, commit=made.commit, base_commit=made.commit, fetched_at=time.time())
        worker = threading.Thread(target=lambda: finished.append(slots.prepare(spec, seen, "", fetch_ttl=3600)))
        started = time.monotonic()
        worker.start()
        worker.join(timeout=0.5)
        assert not finished  # still waiting for the lock
        worker.join(timeout=30)
        assert finished and time.monotonic() - started >= 1.0
        # The lock goes with the holder's exit, which poll() may not see yet when prepare wakes.
        assert holder.wait(timeout=10) == 0
    finally:
        holder.kill()
        holder.wait()


def test_remove_takes_the_copy_and_its_trusted_config(spec):
    path = slots.slot_dir("sample", 0)
    slots.prepare(spec, slots.SlotSeen(path=path), "", fetch_ttl=0)
    assert (path.parent / "0.git-config").exists()
    slots.remove(path)
    assert not path.exists() and not (path.parent / "0.git-config").exists()


def test_the_api_forms_of_spec_and_seen(spec, tmp_path):
    data = {**spec.__dict__, "id": 7}
    assert slots.spec_from_dict(data) == spec
    seen = slots.seen_from_dict(
        {"path": "sample/0", "commit": "c", "base_commit": "b", "setup_hash": "", "fetched_at": "2026-01-01T00:00:00Z",
         "needs_reset": True},
        pool_root=tmp_path,
    )  # fmt: skip
    assert seen.path == tmp_path / "sample/0" and seen.needs_reset and seen.fetched_at == 1767225600.0


def test_a_bundle_carries_the_branch_from_its_base(spec, tmp_path):
    from workcopy import git

    path = slots.slot_dir("sample", 0)
    made = slots.prepare(spec, slots.SlotSeen(path=path), "", fetch_ttl=0)
    git.create_branch(path, "agent/x")
    (path / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    commit = git.commit_all(path, "fix", author_name="a", author_email="a@example.com", keep_paths=[])
    bundle = tmp_path / "result.bundle"
    git.bundle_create(path, bundle, "agent/x", base=made.commit)
    listed = run_git(tmp_path, "bundle", "list-heads", str(bundle))
    assert listed == f"{commit} refs/heads/agent/x"
