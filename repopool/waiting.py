"""Waiting for a slot: first come, first served, woken by the release instead of polling.

On PostgreSQL every (repository, host) pool has a turnstile, an advisory lock
(``turnstile_key``):

- An allocation first tries in one statement (``bookkeeping``): ``pg_try_advisory_xact_lock_shared``
  on the turnstile and, only when that succeeds, the claim of a free slot. Uncontended that is the
  whole cost, one round trip, the lock gone with the statement (or with the caller's transaction). Shared: allocators that find slots
  never shut each other out (no convoy while the pool has room).
- When the try fails (somebody waits in line), or no slot is free and the pool is at its capacity,
  the allocator gets in line: ``pg_advisory_lock`` (exclusive, session-level) with a
  ``lock_timeout`` of its remaining wait, and ``LISTEN`` on the repository's channel, in one round
  trip. PostgreSQL grants a contended lock in the order it was asked for, and refuses a new shared
  try while an exclusive request is queued: the line is FIFO, and a newcomer cannot barge past it,
  it queues behind.
- The head of the line (the lock's holder) tries to claim, then sleeps on its connection's
  notifications (``psycopg``'s ``notifies``) until a slot of its host is freed: a trigger (migration
  ``0008``) runs ``pg_notify('repopool_slot_freed_<repository id>', host)`` in the
  transaction that moves a slot to ``free`` or ``broken`` (a remote host leases a broken slot
  again) or deletes one, so the notification is delivered at commit, whichever code path made the
  change (release, return unchanged, reaping, force release, warm, the admin). It looks again at
  least every ``RECHECK_SECONDS`` anyway: a lease may expire without anybody reaping it yet, a
  host's capacity may grow.
- Served, it leaves the line in the claim's own statement (``pg_advisory_unlock`` once the slot
  is its own), so the next waiter's turn does not wait for that commit's flush; then, in
  ``finally`` (served, timed out or failed), ``UNLISTEN`` (and the unlock if still held) in one
  round trip, the notifications already received dropped. If that fails the connection is
  closed: the server releases a session's locks and listens with the session, so nothing is left
  behind on a connection Django hands out again.

Limits: the line needs a session of its own for as long as the wait lasts, so it does not work
through a pooler in transaction mode (pgbouncer ``pool_mode = transaction``): session locks and
LISTEN would land on whichever server connection the next statement gets. Use session pooling or
direct connections (README, "Serving the API"). Inside a transaction a caller cannot wait in line (a
notification is delivered only between transactions, and a blocked lock request would hold the
transaction's row locks): there it falls back to polling, as on SQLite, and its tries still
respect the line (while somebody waits, it gets nothing).

SQLite (a laptop, one process): no turnstile; waiters poll with a backoff up to a second and are
woken at once by a release in the same process (a ``threading.Condition``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import OperationalError, connection, transaction

T = TypeVar("T")
log = logging.getLogger(__name__)

# "fifo": the line above on PostgreSQL. "poll": the former loop (every waiter retries with a
# backoff up to POLL_MAX_DELAY, no turnstile, whoever looks first wins), kept so bench/pool.py can
# measure both in one run. Not a setting: nothing in production should choose the unfair one.
MODE = "fifo"
RECHECK_SECONDS = 1.0  # the head of the line looks again this often without a notification
POLL_FIRST_DELAY = 0.05
POLL_MAX_DELAY = 1.0
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout

_freed = threading.Condition()
_heads = threading.local()  # the turnstiles this thread (and its connection) holds as head of a line


def in_turn() -> bool:
    """Do allocations go through the turnstile (PostgreSQL, FIFO mode)?"""
    return MODE == "fifo" and connection.vendor == "postgresql"


def turnstile_key(repository_id: int, host: str) -> int:
    """The advisory lock key of a (repository, host) pool: 64 bits of a hash, in the one-key
    space (nothing else of ours takes advisory locks; a collision would only make two pools share
    a line)."""
    digest = hashlib.blake2b(f"repopool-slot-turnstile:{repository_id}:{host}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def line_of(repository_id: int, host: str) -> tuple[int, int]:
    """(sessions holding a pool's turnstile, sessions queued for it), as ``pg_locks`` shows them
    on PostgreSQL: who is being served and who waits in line (``(0, 0)`` elsewhere)."""
    if connection.vendor != "postgresql":
        return 0, 0
    key = turnstile_key(repository_id, host)
    with connection.cursor() as cursor:
        # An advisory lock on one bigint key shows as classid (high 32 bits), objid (low), objsubid 1.
        cursor.execute(
            "SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted) FROM pg_locks "
            "WHERE locktype = 'advisory' AND objsubid = 1 AND classid::bigint = %s AND objid::bigint = %s",
            [(key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF],
        )
        return tuple(cursor.fetchone())


def at_head_of_line(key: int) -> bool:
    """Does this thread's connection hold turnstile ``key`` as the head of its line?"""
    return key in _held()


def left_line(key: int) -> None:
    """The claim that served the head of the line released turnstile ``key`` itself."""
    _held().discard(key)


def _held() -> set[int]:
    if not hasattr(_heads, "keys"):
        _heads.keys = set()
    return _heads.keys


def channel(repository_id: int) -> str:
    """The NOTIFY channel of a repository's slots (the payload is the host); the trigger of
    migration 0008 builds the same name."""
    return f"repopool_slot_freed_{int(repository_id)}"


def slots_freed() -> None:
    """A slot became free (or leasable) in this transaction: wake this process's pollers after
    commit. On PostgreSQL the trigger notifies the lines of every process."""
    transaction.on_commit(_wake_local)


def _wake_local() -> None:
    with _freed:
        _freed.notify_all()


def wait_in_turn(*, repository_id: int, host: str, wait_seconds: float, attempt: Callable[[], T | None]) -> T | None:
    """``attempt()`` (one try to lease: its own short transaction, never blocking) until it
    returns something or ``wait_seconds`` pass; None then.

    On PostgreSQL, outside a transaction, in FIFO mode: the first try is the uncontended path;
    after it the caller waits in line (see the module's docstring), each later try made as the
    head of the line, when a slot of ``host`` was freed or every ``RECHECK_SECONDS``. ``attempt``
    must claim through the turnstile (``bookkeeping``'s claim does) for the line to be fair.
    """
    got = attempt()
    if got is not None or wait_seconds <= 0:
        return got
    deadline = time.monotonic() + wait_seconds
    if in_turn() and not connection.in_atomic_block:
        return _wait_in_line(repository_id, host, deadline, attempt)
    return _poll(deadline, attempt)


def _poll(deadline: float, attempt: Callable[[], T | None]) -> T | None:
    delay = POLL_FIRST_DELAY
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        with _freed:
            _freed.wait(min(delay, remaining))
        delay = min(delay * 2, POLL_MAX_DELAY)
        got = attempt()
        if got is not None:
            return got


def _wait_in_line(repository_id: int, host: str, deadline: float, attempt: Callable[[], T | None]) -> T | None:
    key, listen_on = turnstile_key(repository_id, host), channel(repository_id)
    if not _get_in_line(key, listen_on, deadline):
        return None
    _held().add(key)
    try:
        while True:
            got = attempt()
            if got is not None or key not in _held():
                return got  # (a claim leaves the line only with a slot)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            _sleep_until_freed(listen_on, host, min(RECHECK_SECONDS, remaining))
    finally:
        still_held = key in _held()
        _held().discard(key)
        _leave_line(key if still_held else None, listen_on)


def _get_in_line(key: int, listen_on: str, deadline: float) -> bool:
    """Queue for the turnstile (at most until ``deadline``) and listen; False when the wait ran
    out in the queue. One round trip: the statements run as one implicit transaction, so the
    ``lock_timeout`` is local to it and LISTEN takes effect with it (the session lock stays)."""
    timeout_ms = max(1, int((deadline - time.monotonic()) * 1000))
    try:
        with connection.cursor() as cursor:
            # Literals only (an int and a name made of digits): several statements in one call go
            # without parameters. lock_timeout bounds the wait; a server-wide statement_timeout
            # must not cut it shorter.
            cursor.execute(
                f"SELECT set_config('lock_timeout', '{timeout_ms}', true), "
                f"set_config('statement_timeout', '0', true); "
                f"SELECT pg_advisory_lock({int(key)}); LISTEN {listen_on}"
            )
    except OperationalError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            return False  # not granted: nothing held
        _drop_session()  # a session lock taken in a failed transaction would stay: end the session
        raise
    except BaseException:
        _drop_session()
        raise
    return True


def _sleep_until_freed(listen_on: str, host: str, timeout: float) -> None:
    """Until a slot of ``host`` is freed (a notification on ``listen_on`` naming it) or
    ``timeout``. Notifications that came while a try ran are in psycopg's backlog and end the
    sleep at once."""
    connection.ensure_connection()
    raw = connection.connection
    end = time.monotonic() + timeout
    with connection.wrap_database_errors:  # a connection lost meanwhile: Django's error, as elsewhere
        while (left := end - time.monotonic()) > 0:
            for note in raw.notifies(timeout=left, stop_after=1):
                if note.channel == listen_on and note.payload == host:
                    return


def _leave_line(key: int | None, listen_on: str) -> None:
    """Unlock (unless the claim did) and unlisten; if that fails, end the session (never raise: a
    slot just leased must reach its caller)."""
    try:
        with connection.cursor() as cursor:
            unlock = f"SELECT pg_advisory_unlock({int(key)}); " if key is not None else ""
            cursor.execute(f"{unlock}UNLISTEN {listen_on}")
        for _ in connection.connection.notifies(timeout=0):
            pass  # what arrived before UNLISTEN: not for whoever uses this connection next
    except Exception as exc:
        log.warning("leaving the slot line failed (%s): closing the connection", type(exc).__name__)
        _drop_session()
    except BaseException:
        _drop_session()
        raise


def _drop_session() -> None:
    """Close the connection: the server releases the session's advisory locks and LISTENs."""
    try:
        connection.close()
    except Exception:  # already broken: closed all the same
        pass
