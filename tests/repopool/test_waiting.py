"""Waiting for a slot on PostgreSQL: a line per (repository, host), first come first served, woken by
the release's NOTIFY, and nothing left on the connection afterwards (``repopool.waiting``).

Bookkeeping only (a remote host's pool: no git), each waiter a thread with its own connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from django.db import close_old_connections, connection
from django.test.utils import CaptureQueriesContext

from repopool import bookkeeping, services, waiting
from repopool.errors import NoSlotAvailable
from repopool.models import Slot
from tests.conftest import until

pytestmark = pytest.mark.django_db(transaction=True)
postgres_only = pytest.mark.usefixtures("require_postgres")

HOST = "runner-q"


@pytest.fixture
def repo(make_repo):
    return services.repository_create(name="line", url=str(make_repo()), pool_size=1)


def lease(repo, holder: str, wait: float = 0) -> Slot:
    return bookkeeping.slot_lease(repository=repo, host=HOST, holder=holder, lease_seconds=60, wait_seconds=wait)


def release(slot: Slot) -> None:
    bookkeeping.slot_release_remote(slot_id=slot.pk, token=slot.lease_token, commit="")


def line_of(repo) -> tuple[int, int]:
    return waiting.line_of(repo.pk, HOST)


def left_on_this_connection() -> tuple[list, int]:
    """LISTENs and advisory locks this session still has."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_listening_channels()")
        channels = [row[0] for row in cursor.fetchall()]
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
        return channels, cursor.fetchone()[0]


class Waiter(threading.Thread):
    """slot_lease in a thread of its own; records when it was served and its claim statements."""

    def __init__(self, repo, name: str, wait: float = 20, then: Callable[[Slot], None] | None = None):
        super().__init__(name=name)
        self.repo, self.wait, self.then = repo, wait, then
        self.slot: Slot | None = None
        self.served_at: float | None = None
        self.error: BaseException | None = None
        self.claims = 0

    def run(self) -> None:
        try:
            with CaptureQueriesContext(connection) as queries:
                self.slot = lease(self.repo, self.name, self.wait)
            self.served_at = time.monotonic()
            self.claims = sum("WITH gate AS" in q["sql"] for q in queries.captured_queries)
            if self.then:
                self.then(self.slot)
        except BaseException as exc:
            self.error = exc
        finally:
            connection.close()


@postgres_only
def test_waiters_are_served_in_arrival_order(repo):
    held = lease(repo, "holder")
    served: list[str] = []

    def hold_then_release(slot: Slot) -> None:
        served.append(slot.lease_holder)
        time.sleep(0.05)  # while the next ones wait
        release(slot)

    waiters = []
    for n, name in enumerate(["first", "second", "third"]):
        waiter = Waiter(repo, name, then=hold_then_release)
        waiter.start()
        waiters.append(waiter)
        # The first holds the turnstile (head of the line); each later one queues behind it.
        until(lambda n=n: line_of(repo) == (1, n))
    late = Waiter(repo, "no-wait", wait=0)  # a newcomer that will not wait does not pass them
    late.start()
    late.join()
    assert isinstance(late.error, NoSlotAvailable)
    release(held)
    for waiter in waiters:
        waiter.join(timeout=30)
        assert waiter.error is None, waiter.error
    assert served == ["first", "second", "third"]
    assert line_of(repo) == (0, 0)


@postgres_only
def test_a_release_wakes_the_head_of_the_line_without_polling(repo, monkeypatch):
    monkeypatch.setattr(waiting, "RECHECK_SECONDS", 30.0)  # only a notification can wake it in time
    held = lease(repo, "holder")
    waiter = Waiter(repo, "waiter")
    waiter.start()
    until(lambda: line_of(repo) == (1, 0))
    time.sleep(0.3)  # a poller would have looked several times by now
    released_at = time.monotonic()
    release(held)
    waiter.join(timeout=30)
    assert waiter.error is None and waiter.slot.pk == held.pk
    assert waiter.served_at - released_at < 0.5
    # One try on arrival, one as the head of the line, one when woken: no polling in between.
    assert waiter.claims == 3


@postgres_only
def test_a_busy_line_never_hands_one_slot_to_two(make_repo):
    repo = services.repository_create(name="busy-line", url=str(make_repo()), pool_size=3)
    holders: dict[int, str] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    done = [0]

    def worker(name: str) -> None:
        try:
            for _ in range(15):
                slot = lease(repo, name, wait=30)
                with lock:
                    assert slot.pk not in holders, f"slot {slot.pk} held by {holders.get(slot.pk)} and {name}"
                    holders[slot.pk] = name
                time.sleep(0.002)
                with lock:
                    del holders[slot.pk]
                release(slot)
                with lock:
                    done[0] += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors[:3]
    assert done[0] == 12 * 15
    assert line_of(repo) == (0, 0)
    assert set(Slot.objects.filter(repository=repo).values_list("state", flat=True)) == {"free"}


@postgres_only
def test_a_newcomer_cannot_pass_a_session_in_line(repo):
    held = lease(repo, "holder")
    release(held)  # free now
    key = waiting.turnstile_key(repo.pk, HOST)
    dsn = connection.get_connection_params()
    with psycopg.connect(**dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", [key])  # somebody at the head of the line
        with pytest.raises(NoSlotAvailable):
            lease(repo, "newcomer")
        assert Slot.objects.get(pk=held.pk).state == "free"
        other.execute("SELECT pg_advisory_unlock(%s)", [key])
    assert lease(repo, "newcomer").pk == held.pk


@postgres_only
def test_a_wait_that_runs_out_leaves_no_lock_and_no_listen(repo):
    held = lease(repo, "holder")
    started = time.monotonic()
    with pytest.raises(NoSlotAvailable):
        lease(repo, "impatient", wait=0.3)  # head of the line, then timed out there
    assert time.monotonic() - started >= 0.3
    assert left_on_this_connection() == ([], 0)

    head = Waiter(repo, "head")
    head.start()
    until(lambda: line_of(repo) == (1, 0))
    with pytest.raises(NoSlotAvailable):
        lease(repo, "queued", wait=0.3)  # timed out in the queue for the turnstile (lock_timeout)
    assert left_on_this_connection() == ([], 0)
    with connection.cursor() as cursor:  # and the connection is usable: no aborted transaction
        cursor.execute("SHOW lock_timeout")
        assert cursor.fetchone()[0] == "0"
    release(held)
    head.join(timeout=30)
    assert head.error is None and head.slot.pk == held.pk


@postgres_only
def test_a_statement_timeout_shorter_than_the_wait_does_not_cut_it(repo):
    lease(repo, "holder")
    head = Waiter(repo, "head", wait=1.5)
    head.start()
    until(lambda: line_of(repo) == (1, 0))
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '100ms'")  # as a server might set it for everybody
    try:
        started = time.monotonic()
        with pytest.raises(NoSlotAvailable):
            lease(repo, "queued", wait=0.5)  # queued for the turnstile longer than the timeout
        assert time.monotonic() - started >= 0.5
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET statement_timeout")
    head.join(timeout=30)
    assert isinstance(head.error, NoSlotAvailable)


@postgres_only
def test_an_error_in_line_still_leaves_the_line(repo):
    lease(repo, "holder")
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) == 2:  # the first try as the head of the line
            raise RuntimeError("boom")
        return None

    with pytest.raises(RuntimeError):
        waiting.wait_in_turn(repository_id=repo.pk, host=HOST, wait_seconds=5, attempt=attempt)
    assert left_on_this_connection() == ([], 0) and line_of(repo) == (0, 0)


@postgres_only
def test_every_way_a_slot_comes_free_notifies_its_line(repo):
    """The trigger: release, return unchanged, reaping, force release and delete all notify."""
    key_channel = waiting.channel(repo.pk)
    dsn = connection.get_connection_params()
    with psycopg.connect(**dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {key_channel}")

        def heard() -> list[str]:
            return [n.payload for n in listener.notifies(timeout=0.5, stop_after=1)]

        slot = lease(repo, "a")
        assert heard() == []  # a lease says nothing
        release(slot)
        assert heard() == [HOST]
        slot = lease(repo, "b")
        bookkeeping.slot_return_unchanged(slot_id=slot.pk, token=slot.lease_token)
        assert heard() == [HOST]
        slot = lease(repo, "c")
        Slot.objects.filter(pk=slot.pk).update(lease_expires_at=slot.leased_at)
        assert bookkeeping.slots_reap_remote() == [slot.pk]
        assert heard() == [HOST]
        lease(repo, "d")
        services.slot_force_release(slot_id=slot.pk)
        assert heard() == [HOST]
        Slot.objects.filter(pk=slot.pk).delete()
        assert heard() == [HOST]


def test_without_the_line_pollers_are_still_woken_in_process(repo, monkeypatch):
    """The fallback (SQLite, or a caller inside a transaction; on PostgreSQL forced here): a release
    in this process wakes the poller at once, even when its backoff has grown to a second."""
    monkeypatch.setattr(waiting, "MODE", "poll")
    held = lease(repo, "holder")
    waiter = Waiter(repo, "poller")
    waiter.start()
    time.sleep(1.6)  # its backoff is now near a second
    released_at = time.monotonic()
    release(held)
    waiter.join(timeout=30)
    assert waiter.error is None and waiter.slot.pk == held.pk
    assert waiter.served_at - released_at < 0.5
    close_old_connections()
