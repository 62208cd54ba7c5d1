from __future__ import annotations

import os
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import close_old_connections, connection
from django.utils import timezone

from repopool import services
from repopool.errors import NoSlotAvailable, StaleLease
from repopool.models import Slot
from tests.conftest import run_git, write_files
from workcopy import git

pytestmark = pytest.mark.django_db


def status_of(path: Path) -> str:
    return run_git(path, "status", "--porcelain", "--ignored")


def test_warm_clones_pool_and_runs_setup_once(make_repo):
    origin = make_repo()
    repo = services.repository_create(
        name="warm",
        url=str(origin),
        pool_size=3,
        setup_command="mkdir -p .venv && echo ran >> .venv/setup.log",
        keep_paths=[".venv"],
    )
    slots = services.pool_warm(repository=repo)
    assert [s.state for s in slots] == ["free"] * 3
    head = run_git(origin, "rev-parse", "HEAD")
    for slot in slots:
        path = Path(slot.path)
        assert path.is_relative_to(Path(services.slot_path(repo, 0)).parent)
        assert (path / "calc.py").exists() and slot.commit == head
        assert (path / ".venv/setup.log").read_text() == "ran\n"
    # Warming again changes nothing: the pool is full.
    assert [s.pk for s in services.pool_warm(repository=repo)] == [s.pk for s in slots]


def test_registering_a_url_that_is_not_git_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(git.GitError) as info:
        services.repository_create(name="plain", url=str(tmp_path / "plain"))
    assert info.value.field == "url"


def test_failing_setup_breaks_slot_with_error_and_later_warm_repairs(make_repo):
    repo = services.repository_create(
        name="bad-setup", url=str(make_repo()), pool_size=1, setup_command="echo boom >&2; exit 3"
    )
    [slot] = services.pool_warm(repository=repo)
    assert slot.state == "broken"
    assert "exited with 3" in slot.last_error and "boom" in slot.last_error
    repo.setup_command = "true"
    repo.save()
    [slot] = services.pool_warm(repository=repo)
    assert slot.state == "free" and slot.last_error == ""


def test_hanging_setup_is_killed_with_its_process_group(make_repo, settings):
    settings.REPO_POOL_SETUP_TIMEOUT = 1
    # The background child's pid lives in the sandbox's own pid namespace: find it by its argv.
    repo = services.repository_create(
        name="hang", url=str(make_repo()), pool_size=1, setup_command="sleep 317 & sleep 318"
    )
    [slot] = services.pool_warm(repository=repo)
    assert slot.state == "broken" and "timed out" in slot.last_error

    def alive() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if open(f"/proc/{pid}/cmdline", "rb").read() in (b"sleep\x00317\x00", b"sleep\x00318\x00"):
                    found.append(int(pid))
            except OSError:
                pass
        return found

    for _ in range(50):  # the background grandchild died with the command
        if not alive():
            break
        threading.Event().wait(0.05)
    assert alive() == []


def test_fetch_ttl_skips_a_fetch_right_after_one(make_repo, settings):
    origin = make_repo()
    repository = services.repository_create(name="ttl", url=str(origin), pool_size=1)
    lease = services.slot_allocate(repository=repository, holder="a")
    services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
    write_files(origin, {"calc.py": "changed\n"})
    run_git(origin, "commit", "-qam", "newer")
    newer = run_git(origin, "rev-parse", "HEAD")
    settings.REPO_POOL_FETCH_TTL = 3600
    again = services.slot_allocate(repository=repository, holder="b")
    assert again.slot_id == lease.slot_id
    assert again.commit == lease.commit != newer  # fetched moments ago: not fetched again
    services.slot_release(slot_id=again.slot_id, lease_token=again.lease_token)
    settings.REPO_POOL_FETCH_TTL = 0
    fresh = services.slot_allocate(repository=repository, holder="c")
    assert fresh.commit == newer


def test_allocate_checks_out_ref_fetching_new_branches(repository):
    services.pool_warm(repository=repository)
    origin = Path(repository.url)
    run_git(origin, "checkout", "-q", "-b", "feature")
    write_files(origin, {"feature.txt": "new\n"})
    run_git(origin, "add", "-A")
    run_git(origin, "commit", "-q", "-m", "feature")
    feature = run_git(origin, "rev-parse", "HEAD")
    run_git(origin, "checkout", "-q", "main")
    lease = services.slot_allocate(repository=repository, holder="t1", ref="feature")
    assert lease.commit == feature
    assert (lease.path / "feature.txt").read_text() == "new\n"
    assert git.head(lease.path) == feature
    services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
    slot = Slot.objects.get(pk=lease.slot_id)
    assert slot.state == "free" and not (lease.path / "feature.txt").exists()


def test_missing_ref_is_refused_and_slot_returns_to_pool(repository):
    services.pool_warm(repository=repository)
    with pytest.raises(git.RefNotFound):
        services.slot_allocate(repository=repository, holder="t1", ref="no-such-branch")
    assert set(Slot.objects.values_list("state", flat=True)) == {"free"}


def test_release_removes_every_change_but_keeps_keep_paths(repository):
    services.pool_warm(repository=repository)
    lease = services.slot_allocate(repository=repository, holder="agent")
    path = lease.path
    (path / ".venv").mkdir()
    (path / ".venv/keep.txt").write_text("kept")
    (path / "calc.py").write_text("broken = (\n")  # modified
    (path / "README.md").unlink()  # deleted
    (path / "new_dir").mkdir()
    (path / "new_dir/new.py").write_text("x = 1\n")  # untracked
    (path / "build").mkdir()
    (path / "build/out.o").write_text("ignored")  # ignored
    run_git(path, "checkout", "-q", "-b", "agent/abc")
    run_git(path, "add", "-A")
    run_git(path, "commit", "-q", "-m", "agent work")
    run_git(path, "checkout", "-q", "--detach", "HEAD~1")
    (path / "calc.py").write_text("again dirty\n")
    run_git(path, "stash", "-q")
    services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
    assert status_of(path) == "!! .venv/"
    assert (path / ".venv/keep.txt").read_text() == "kept"
    assert (path / "README.md").exists() and "a - b" in (path / "calc.py").read_text()
    assert run_git(path, "for-each-ref", "refs/heads", "refs/stash") == ""
    assert git.head(path) == run_git(Path(repository.url), "rev-parse", "main")


def test_fencing_stale_token_cannot_renew_or_release(repository):
    services.pool_warm(repository=repository)
    first = services.slot_allocate(repository=repository, holder="old", lease_seconds=60)
    Slot.objects.filter(pk=first.slot_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    reaped = services.slots_reap()
    assert first.slot_id in reaped
    Slot.objects.exclude(pk=first.slot_id).update(state="broken")  # make sure the reaped slot is re-leased
    second = services.slot_allocate(repository=repository, holder="new", lease_seconds=60)
    assert second.slot_id == first.slot_id and second.lease_token != first.lease_token
    for call in (
        lambda: services.slot_release(slot_id=first.slot_id, lease_token=first.lease_token),
        lambda: services.slot_renew(slot_id=first.slot_id, lease_token=first.lease_token, lease_seconds=60),
        lambda: services.slot_release(slot_id=first.slot_id, lease_token=uuid.uuid4()),
    ):
        with pytest.raises(StaleLease):
            call()
    slot = Slot.objects.get(pk=second.slot_id)
    assert slot.state == "leased" and slot.lease_token == second.lease_token and slot.lease_holder == "new"
    expires = services.slot_renew(slot_id=second.slot_id, lease_token=second.lease_token, lease_seconds=600)
    assert expires > second.lease_expires_at


def test_reaping_resets_an_expired_dirty_slot(repository):
    services.pool_warm(repository=repository)
    lease = services.slot_allocate(repository=repository, holder="dies")
    (lease.path / "junk.txt").write_text("left by a dead runner")
    assert services.slots_reap() == []  # not expired yet
    Slot.objects.filter(pk=lease.slot_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert services.slots_reap() == [lease.slot_id]
    slot = Slot.objects.get(pk=lease.slot_id)
    assert slot.state == "free" and slot.lease_token is None
    assert not (lease.path / "junk.txt").exists()


@pytest.mark.django_db(transaction=True)
def test_wait_then_no_slot_available(make_repo):
    repo = services.repository_create(name="one", url=str(make_repo()), pool_size=1)
    held = services.slot_allocate(repository=repo, holder="a")
    started = timezone.now()
    with pytest.raises(NoSlotAvailable):
        services.slot_allocate(repository=repo, holder="b", wait_seconds=0.5)
    assert (timezone.now() - started).total_seconds() >= 0.5

    def release_soon():
        threading.Event().wait(0.3)
        services.slot_release(slot_id=held.slot_id, lease_token=held.lease_token)
        connection.close()

    releaser = threading.Thread(target=release_soon)
    releaser.start()
    got = services.slot_allocate(repository=repo, holder="b", wait_seconds=5)
    releaser.join()
    assert got.slot_id == held.slot_id


def test_pool_grows_on_demand_up_to_its_size(make_repo):
    repo = services.repository_create(name="grow", url=str(make_repo()), pool_size=2)
    a = services.slot_allocate(repository=repo, holder="a")
    b = services.slot_allocate(repository=repo, holder="b")
    assert a.slot_id != b.slot_id and Slot.objects.filter(repository=repo).count() == 2
    with pytest.raises(NoSlotAvailable):
        services.slot_allocate(repository=repo, holder="c")


def test_deleted_slot_folder_is_marked_broken_and_pool_serves_on(repository):
    import shutil

    slots = services.pool_warm(repository=repository)
    shutil.rmtree(slots[0].path)
    leases = [services.slot_allocate(repository=repository, holder=f"h{i}") for i in range(1)]
    assert Slot.objects.get(pk=slots[0].pk).state == "broken"
    assert "missing" in Slot.objects.get(pk=slots[0].pk).last_error
    assert leases[0].slot_id == slots[1].pk
    repaired = services.pool_warm(repository=repository)
    assert Slot.objects.get(pk=slots[0].pk).state == "free" and len(repaired) == 2


def test_corrupted_git_folder_at_release_marks_slot_broken(repository):
    import shutil

    services.pool_warm(repository=repository)
    lease = services.slot_allocate(repository=repository, holder="a")
    shutil.rmtree(lease.path / ".git")
    slot = services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
    assert slot.state == "broken" and "reset failed" in slot.last_error


def test_setup_reruns_only_when_a_watched_file_changes(make_repo, settings):
    settings.REPO_POOL_FETCH_TTL = 0
    origin = make_repo({**{"requirements.txt": "a\n"}, "test_x.py": "def test(): pass\n"})
    repo = services.repository_create(
        name="watch",
        url=str(origin),
        pool_size=1,
        setup_command="mkdir -p .venv && echo x >> .venv/count",
        setup_watch_files=["requirements.txt"],
        keep_paths=[".venv"],
    )
    [slot] = services.pool_warm(repository=repo)
    count = Path(slot.path) / ".venv/count"
    for _ in range(2):
        lease = services.slot_allocate(repository=repo, holder="a")
        services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
    assert count.read_text().count("x") == 1
    write_files(origin, {"requirements.txt": "a\nb\n"})
    run_git(origin, "commit", "-qam", "new dependency")
    lease = services.slot_allocate(repository=repo, holder="a", ref="main")
    assert count.read_text().count("x") == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_allocators_never_share_a_slot(require_postgres, make_repo):
    repo = services.repository_create(name="busy", url=str(make_repo()), pool_size=4)
    services.pool_warm(repository=repo)
    holders: dict[int, str] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    rounds = {"done": 0}
    barrier = threading.Barrier(16)

    def worker(i):
        try:
            barrier.wait()
            for n in range(13):
                lease = services.slot_allocate(repository=repo, holder=f"w{i}", wait_seconds=60)
                with lock:
                    assert lease.slot_id not in holders, f"slot {lease.slot_id} held by {holders.get(lease.slot_id)}"
                    holders[lease.slot_id] = f"w{i}/{n}"
                slot = Slot.objects.get(pk=lease.slot_id)
                assert slot.lease_token == lease.lease_token
                (lease.path / f"dirt-{i}-{n}").write_text("x")
                with lock:
                    del holders[lease.slot_id]
                services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
                with lock:
                    rounds["done"] += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close_old_connections()
    assert not errors, errors[:3]
    assert rounds["done"] == 16 * 13 >= 200
    slots = list(Slot.objects.filter(repository=repo))
    assert len(slots) == 4 and {s.state for s in slots} == {"free"}
    for slot in slots:
        assert status_of(Path(slot.path)) == ""
