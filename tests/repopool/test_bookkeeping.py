"""The pool's server-side bookkeeping for slots on other hosts: database only, the working copies
made by ``workcopy.slots`` under a pool root of the (simulated) runner host's own."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from repopool import bookkeeping, services
from repopool.errors import NoSlotAvailable, SlotNotFound, StaleLease
from repopool.models import Slot
from tests.conftest import run_git, write_files
from workcopy import slots

pytestmark = pytest.mark.django_db

HOST = "runner-b"


def lease(repository, *, host=HOST, capacity=None, holder="h") -> Slot:
    return bookkeeping.slot_lease(
        repository=repository, host=host, holder=holder, lease_seconds=60, wait_seconds=0, capacity=capacity
    )


def prepare_remote(repository, slot: Slot, pool_root: Path, ref: str = "") -> slots.Prepared:
    """What a runner host does with a lease: make the copy under its own pool root, report it."""
    ready = slots.prepare(
        services.repo_spec(repository), services.slot_seen(slot, pool_root=pool_root), ref, fetch_ttl=10
    )
    bookkeeping.slot_prepared(
        slot_id=slot.pk, token=slot.lease_token, commit=ready.commit, setup_hash=ready.setup_hash,
        fetched=ready.fetched, base_commit=ready.base_commit,
    )  # fmt: skip
    return ready


def test_a_remote_host_grows_its_own_pool_up_to_its_capacity(repository):
    first, second = lease(repository, capacity=2), lease(repository, capacity=2)
    assert {first.host, second.host} == {HOST} and {first.index, second.index} == {0, 1}
    # Its path is relative: under that host's pool root, in its own folder; never prepared: empty commit.
    assert first.path == f"@{HOST}/{repository.name}/{first.index}" and first.commit == "" and first.state == "leased"
    with pytest.raises(NoSlotAvailable) as refused:
        lease(repository, capacity=2)
    assert f"pool size 2 on {HOST}" in refused.value.message
    # Another host's pool and the server's own are apart: each grows its own.
    other = lease(repository, host="runner-c", capacity=1)
    assert other.host == "runner-c" and other.index == 0
    assert not Slot.objects.filter(host=bookkeeping.server_host()).exists()
    # Without a capacity announced, the repository's pool_size bounds the host's pool.
    assert repository.pool_size == 2 and lease(repository, host="runner-d").index == 0


def test_prepare_release_and_reuse_through_the_bookkeeping(repository, tmp_path):
    pool_root = tmp_path / "host-b-pool"
    slot = lease(repository)
    ready = prepare_remote(repository, slot, pool_root)
    row = Slot.objects.get(pk=slot.pk)
    head = run_git(Path(repository.url), "rev-parse", "HEAD")
    assert row.commit == row.base_commit == ready.commit == head and row.fetched_at is not None
    copy = pool_root / row.path
    assert (copy / "calc.py").exists() and not (Path(services.slot_path(repository, 0))).exists()
    (copy / "junk.txt").write_text("task output")

    slots.reset(services.repo_spec(repository), copy, row.base_commit)
    freed = bookkeeping.slot_release_remote(slot_id=slot.pk, token=slot.lease_token, commit=row.base_commit)
    assert freed.state == "free" and freed.lease_token is None and not (copy / "junk.txt").exists()
    with pytest.raises(StaleLease):  # the old token is spent
        bookkeeping.slot_release_remote(slot_id=slot.pk, token=slot.lease_token, commit=head)
    with pytest.raises(StaleLease):
        bookkeeping.slot_prepared(slot_id=slot.pk, token=slot.lease_token, commit=head, setup_hash="", fetched=False)

    again = lease(repository)
    assert again.pk == slot.pk and again.commit == head and again.lease_token != slot.lease_token


def test_an_expired_remote_lease_is_freed_for_its_host_to_reset(repository, tmp_path):
    pool_root = tmp_path / "host-b-pool"
    slot = lease(repository)
    prepare_remote(repository, slot, pool_root)
    copy = pool_root / slot.path
    write_files(copy, {"calc.py": "dirt left by a runner that died\n", "new.txt": "x\n"})
    local = services.slot_allocate(repository=repository, holder="server", lease_seconds=60)
    Slot.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    reaped = services.slots_reap()
    assert set(reaped) == {slot.pk, local.slot_id}
    row = Slot.objects.get(pk=slot.pk)
    assert row.state == "free" and row.needs_reset and row.lease_token is None
    # The server never touched the remote disk: the dirt is still there ...
    assert (copy / "new.txt").exists()
    with pytest.raises(StaleLease):
        bookkeeping.slot_renew(slot_id=slot.pk, lease_token=slot.lease_token)
    # ... until the host leases it again: the reset comes first.
    again = lease(repository)
    assert again.pk == slot.pk and again.needs_reset
    ready = prepare_remote(repository, again, pool_root)
    assert not (copy / "new.txt").exists() and "a - b" in (copy / "calc.py").read_text()
    assert ready.commit == row.base_commit and not Slot.objects.get(pk=slot.pk).needs_reset


def test_a_broken_remote_slot_is_leased_again_to_be_made_from_scratch(repository, tmp_path):
    slot = lease(repository, capacity=1)
    bookkeeping.slot_release_remote(slot_id=slot.pk, token=slot.lease_token, commit="", broken_reason="setup failed")
    row = Slot.objects.get(pk=slot.pk)
    assert row.state == "broken" and row.last_error == "setup failed"
    again = lease(repository, capacity=1)
    assert again.pk == slot.pk and again.state == "leased" and again.commit == ""
    prepare_remote(repository, again, tmp_path / "pool")
    assert Slot.objects.get(pk=slot.pk).commit


def test_the_in_process_pool_keeps_its_slots_on_the_server_host(repository):
    lease_ = services.slot_allocate(repository=repository, holder="a")
    row = Slot.objects.get(pk=lease_.slot_id)
    assert row.host == bookkeeping.server_host() and Path(row.path).is_absolute()
    assert row.commit == row.base_commit and row.fetched_at is not None and not row.needs_reset


def test_a_remote_release_is_fenced_and_keeps_the_commit_when_it_names_none(repository):
    slot = lease(repository)
    Slot.objects.filter(pk=slot.pk).update(commit="a" * 40)
    with pytest.raises(SlotNotFound):
        bookkeeping.slot_release_remote(slot_id=slot.pk + 1000, token=slot.lease_token, commit="")
    with pytest.raises(SlotNotFound):
        bookkeeping.slot_release_remote(slot_id="nope", token=slot.lease_token, commit="")
    for wrong in (uuid.uuid4(), "not-a-uuid", None):
        with pytest.raises(StaleLease):
            bookkeeping.slot_release_remote(slot_id=slot.pk, token=wrong, commit="")
    assert Slot.objects.get(pk=slot.pk).state == "leased"
    freed = bookkeeping.slot_release_remote(slot_id=slot.pk, token=str(slot.lease_token), commit="")
    assert (freed.state, freed.commit, freed.lease_token, freed.lease_holder) == ("free", "a" * 40, None, "")
    assert Slot.objects.get(pk=slot.pk).state == "free"
