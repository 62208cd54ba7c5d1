"""The pool's bookkeeping on the server: slot rows, leases, fencing tokens, states. Database only:
no git, no disk. The working copies live on the host that owns them (``workcopy.slots``); the
in-process pool (``repopool.services``) composes these functions with that module on the server's
own host, and the runner API serves them to remote hosts.

Invariants:
- A slot changes state only through conditional UPDATEs (``WHERE state=... [AND lease_token=...]``);
  the row count says whether we won.
- ``lease_token`` is the fencing token, new for every lease: prepared, renew and release must
  present it, so a holder whose lease expired (reaped, maybe re-leased) can never touch the slot.
- A host leases only its own slots (``host``), and grows its pool up to its capacity.
- The server cannot reset a remote host's disk: a remote lease that expired becomes ``free`` with
  ``needs_reset`` set, and the host resets the copy before its next use.
- Waiters are served first come, first served, woken by the release (``repopool.waiting``): on
  PostgreSQL a claim goes through the pool's turnstile, so nobody takes a slot past a waiter.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from common.errors import DomainError
from repopool import waiting
from repopool.errors import NoSlotAvailable, SlotNotFound, StaleLease
from repopool.models import Repository, Slot, SlotState
from repopool.waiting import slots_freed, turnstile_key, wait_in_turn

St = SlotState
DEFAULT_LEASE_SECONDS = 3600  # a renew of a lease whose length was never stored


def server_host() -> str:
    """The host name of the server's own pool (the in-process runners)."""
    return settings.AGENTRUNNER_HOST


def slot_path_for(repository: Repository, host: str, index: int) -> str:
    """The path stored for a slot: absolute on the server's host; on a remote host relative to
    that host's pool root (``@<host>/<repository name>/<index>``, see ``workcopy.layout``)."""
    from pathlib import Path

    from workcopy.layout import remote_slot_path

    if host == server_host():
        return str(Path(settings.REPO_POOL_ROOT) / repository.name / str(index))
    return remote_slot_path(host, repository.name, index)


def validate_lease_seconds(lease_seconds: int) -> None:
    if not 1 <= lease_seconds <= settings.REPO_POOL_MAX_LEASE_SECONDS:
        raise DomainError(
            f"lease_seconds must be between 1 and {settings.REPO_POOL_MAX_LEASE_SECONDS}", field="lease_seconds"
        )


def validate_wait_seconds(wait_seconds: float) -> None:
    if not 0 <= wait_seconds <= settings.REPO_POOL_MAX_WAIT_SECONDS:
        raise DomainError(
            f"wait_seconds must be between 0 and {settings.REPO_POOL_MAX_WAIT_SECONDS}", field="wait_seconds"
        )


def slot_get(slot_id: int) -> Slot:
    try:
        return Slot.objects.select_related("repository").get(pk=slot_id)
    except (Slot.DoesNotExist, ValueError, TypeError):
        raise SlotNotFound(f"slot {slot_id} does not exist") from None


# --- rows ----------------------------------------------------------------------------------------
def slot_create_row(
    repository: Repository, *, host: str, capacity: int, state: str = St.CLONING, **fields
) -> Slot | None:
    """Insert a slot at the lowest free index of ``host``; None when its pool is at ``capacity``."""
    taken = set(Slot.objects.filter(repository=repository, host=host).values_list("index", flat=True))
    if len(taken) >= capacity:
        return None
    index = next(i for i in range(capacity + len(taken) + 1) if i not in taken)
    try:
        with transaction.atomic():
            return Slot.objects.create(
                repository=repository,
                index=index,
                host=host,
                path=slot_path_for(repository, host, index),
                state=state,
                **fields,
            )
    except IntegrityError:
        return None  # another process took that index first


def slot_mark_broken_row(
    slot_id: int, error: str, *, from_states: list[str] | None = None, token: uuid.UUID | str | None = None
) -> bool:
    """Take the slot out of service with why; True when this call did it."""
    query = Slot.objects.filter(pk=slot_id)
    if from_states:
        query = query.filter(state__in=from_states)
    if token is not None:
        query = query.filter(lease_token=token)
    done = query.update(
        state=St.BROKEN,
        last_error=error[:10000],
        lease_token=None,
        lease_holder="",
        lease_expires_at=None,
        state_changed_at=timezone.now(),
    )
    if done:
        slots_freed()  # a remote host's waiter may lease it to make it again
    return bool(done)


def slot_record_clone(slot_id: int, *, commit: str, setup_hash: str, final_state: str, **fields) -> None:
    """A fresh copy was made at ``commit`` (the default branch: what a reset returns to)."""
    Slot.objects.filter(pk=slot_id).update(
        state=final_state,
        commit=commit,
        base_commit=commit,
        setup_hash=setup_hash,
        fetched_at=timezone.now(),
        needs_reset=False,
        last_error="",
        state_changed_at=timezone.now(),
        **fields,
    )
    if final_state == St.FREE:
        slots_freed()


# --- leases --------------------------------------------------------------------------------------
# PostgreSQL: the hot statements (a claim, a remote release) in one round trip each, the row back
# with RETURNING (the ORM has no UPDATE ... RETURNING).
_SLOT_FIELDS = [f.attname for f in Slot._meta.concrete_fields]
_q = connection.ops.quote_name
_SLOT_TABLE = _q(Slot._meta.db_table)
_RETURNING = ", ".join(_q(Slot._meta.get_field(name).column) for name in _SLOT_FIELDS)
_CLAIM_IN_TURN_SQL = f"""
WITH gate AS MATERIALIZED (SELECT {{gate}} AS open),
pick AS (
    SELECT id FROM {_SLOT_TABLE}
    WHERE repository_id = %(repository)s AND host = %(host)s AND state = 'free' AND (SELECT open FROM gate)
    ORDER BY lease_count, {_q("index")}
    LIMIT 1
    FOR UPDATE SKIP LOCKED
),
leased AS (
    UPDATE {_SLOT_TABLE} s
    SET state = 'leased', lease_token = %(token)s, lease_holder = %(holder)s, leased_at = %(now)s,
        lease_expires_at = %(expires)s, lease_seconds = %(lease_seconds)s, lease_count = s.lease_count + 1,
        state_changed_at = %(now)s
    FROM pick WHERE s.id = pick.id AND s.state = 'free'
    RETURNING {", ".join(f"s.{column}" for column in _RETURNING.split(", "))}
)
SELECT (SELECT open FROM gate), {{left_line}} AS left_line, leased.* FROM (SELECT) AS one LEFT JOIN leased ON true
"""
# A newcomer tries the turnstile shared: claimers never shut each other out, only a waiter (who
# holds it exclusive, or is queued for it) does. The head of the line holds it already (its session
# lock) and, once it has a slot, leaves the line in the same statement: the next waiter may claim
# while this claim's commit is still being flushed.
_CLAIM_AS_NEWCOMER_SQL = _CLAIM_IN_TURN_SQL.format(
    gate="pg_try_advisory_xact_lock_shared(%(turnstile)s)", left_line="false"
)
_CLAIM_AS_HEAD_SQL = _CLAIM_IN_TURN_SQL.format(
    gate="true", left_line="leased.id IS NOT NULL AND pg_advisory_unlock(%(turnstile)s)"
)


def _claim_free_in_turn(repository: Repository, host: str, holder: str, lease_seconds: int) -> tuple[Slot | None, bool]:
    """PostgreSQL, one statement: through the pool's turnstile (``repopool.waiting``), move one
    free slot of ``host`` to leased. Returns (the slot or None, whether the turnstile was open):
    closed means somebody waits in line, and this caller must get in line behind them.

    A newcomer's try is transaction-level: held for this statement only (or the caller's
    transaction, the runner API's, which commits the lease with its idempotency record)."""
    now = timezone.now()
    key = turnstile_key(repository.pk, host)
    params = {
        "turnstile": key, "repository": repository.pk, "host": host,
        "token": Slot.new_token(), "holder": holder[:255], "now": now,
        "expires": now + timedelta(seconds=lease_seconds), "lease_seconds": lease_seconds,
    }  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM_AS_HEAD_SQL if waiting.at_head_of_line(key) else _CLAIM_AS_NEWCOMER_SQL, params)
        is_open, left_line, *values = cursor.fetchone()
    if left_line:
        waiting.left_line(key)
    if values[0] is None:
        return None, bool(is_open)
    slot = Slot.from_db(connection.alias, _SLOT_FIELDS, values)
    slot.repository = repository
    return slot, True


_RELEASE_FREE_SQL = f"""
UPDATE {_SLOT_TABLE}
SET state = 'free', lease_token = NULL, lease_holder = '', lease_expires_at = NULL, needs_reset = false,
    state_changed_at = %(now)s, {_q("commit")} = COALESCE(NULLIF(%(commit)s, ''), {_q("commit")})
WHERE id = %(id)s AND state = 'leased' AND lease_token = %(token)s
RETURNING {_RETURNING}
"""


def _claim_free(repository: Repository, host: str, holder: str, lease_seconds: int) -> Slot | None:
    """Atomically move one free slot of ``host`` to leased; None when there is none."""
    now = timezone.now()
    token = Slot.new_token()
    with transaction.atomic():
        candidate = (
            Slot.objects.filter(repository=repository, host=host, state=St.FREE)
            .order_by("lease_count", "index")
            .select_for_update(skip_locked=True)
            .first()
        )
        if candidate is None:
            return None
        updated = Slot.objects.filter(pk=candidate.pk, state=St.FREE).update(
            state=St.LEASED,
            lease_token=token,
            lease_holder=holder[:255],
            leased_at=now,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            lease_seconds=lease_seconds,
            lease_count=candidate.lease_count + 1,
            state_changed_at=now,
        )
    if not updated:
        return None
    candidate.refresh_from_db()
    return candidate


def _grow(repository: Repository, host: str, holder: str, lease_seconds: int, capacity: int) -> Slot | None:
    """A new slot row, leased at once (its copy does not exist yet: ``commit`` is empty, the
    holder clones it when preparing)."""
    now = timezone.now()
    return slot_create_row(
        repository, host=host, capacity=capacity, state=St.LEASED, lease_token=Slot.new_token(),
        lease_holder=holder[:255], leased_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds),
        lease_seconds=lease_seconds, lease_count=1,
    )  # fmt: skip


def _reclaim_broken(repository: Repository, host: str, holder: str, lease_seconds: int) -> Slot | None:
    """A broken slot of a remote host, leased to be made again from scratch (the server cannot
    re-clone a remote disk the way ``pool_warm`` does on its own)."""
    now = timezone.now()
    token = Slot.new_token()
    with transaction.atomic():
        candidate = (
            Slot.objects.filter(repository=repository, host=host, state=St.BROKEN)
            .order_by("index")
            .select_for_update(skip_locked=True)
            .first()
        )
        if candidate is None:
            return None
        Slot.objects.filter(pk=candidate.pk, state=St.BROKEN).update(
            state=St.LEASED, lease_token=token, lease_holder=holder[:255], leased_at=now,
            lease_expires_at=now + timedelta(seconds=lease_seconds), lease_seconds=lease_seconds,
            lease_count=candidate.lease_count + 1, commit="", base_commit="", setup_hash="", fetched_at=None,
            needs_reset=False, state_changed_at=now,
        )  # fmt: skip
    candidate.refresh_from_db()
    return candidate


def _lease_once(repository: Repository, host: str, holder: str, lease_seconds: int, capacity: int) -> Slot | None:
    """One try, never waiting: a free slot, else a new row below ``capacity``, else (a remote
    host) a broken one. Through the turnstile, a closed one means None (get in line)."""
    if waiting.in_turn():
        slot, is_open = _claim_free_in_turn(repository, host, holder, lease_seconds)
        if slot is not None or not is_open:
            return slot
    else:
        slot = _claim_free(repository, host, holder, lease_seconds)
        if slot is not None:
            return slot
    slot = _grow(repository, host, holder, lease_seconds, capacity)
    if slot is None and host != server_host():
        slot = _reclaim_broken(repository, host, holder, lease_seconds)
    return slot


def slot_lease(
    *,
    repository: Repository,
    host: str,
    holder: str,
    lease_seconds: int = DEFAULT_LEASE_SECONDS,
    wait_seconds: float = 0,
    capacity: int | None = None,
) -> Slot:
    """Lease a slot of ``host`` for ``repository``: a free one (least used first), else a new row
    while the host's pool is below ``capacity`` (default: the repository's pool_size), else (a
    remote host) a broken one to be made again; waits up to ``wait_seconds``, then NoSlotAvailable.

    Waiters are served in arrival order and woken by a release (``repopool.waiting``); a caller
    with ``wait_seconds=0`` does not get in line: when others wait, there is no slot for it.

    The returned row says what the holder must do before use: ``commit`` empty, clone;
    ``needs_reset``, reset first. The holder reports the result with ``slot_prepared``."""
    validate_lease_seconds(lease_seconds)
    validate_wait_seconds(wait_seconds)
    capacity = capacity or repository.pool_size
    slot = wait_in_turn(
        repository_id=repository.pk, host=host, wait_seconds=wait_seconds,
        attempt=lambda: _lease_once(repository, host, holder, lease_seconds, capacity),
    )  # fmt: skip
    if slot is None:
        raise NoSlotAvailable(
            f"no slot of {repository.name} became free within {wait_seconds:g}s (pool size {capacity} on {host})"
        )
    return slot


def slot_prepared(
    *, slot_id: int, token: uuid.UUID | str, commit: str, setup_hash: str, fetched: bool, base_commit: str = ""
) -> Slot:
    """The holder made the copy ready at ``commit``: record it (fenced by ``token``). ``fetched``:
    origin was fetched now (the fetch TTL starts again). ``base_commit`` is what a reset returns
    to, given when the copy was cloned now; a slot that never had one takes ``commit``."""
    fields: dict = {"commit": commit, "setup_hash": setup_hash, "needs_reset": False, "last_error": ""}
    if fetched:
        fields["fetched_at"] = timezone.now()
    if base_commit:
        fields["base_commit"] = base_commit
    slot_get(slot_id)
    with transaction.atomic():
        current = Slot.objects.filter(pk=slot_id, state=St.LEASED, lease_token=token)
        if not current.update(**fields):
            raise StaleLease("lease token does not match the slot's current lease")
        current.filter(base_commit="").update(base_commit=commit)
    return slot_get(slot_id)


def slot_return_unchanged(*, slot_id: int, token: uuid.UUID | str) -> None:
    """Give back a lease whose copy was not touched (the ref did not exist)."""
    if Slot.objects.filter(pk=slot_id, state=St.LEASED, lease_token=token).update(
        state=St.FREE, lease_token=None, lease_holder="", lease_expires_at=None, state_changed_at=timezone.now()
    ):
        slots_freed()


def slot_renew(*, slot_id: int, lease_token: uuid.UUID | str, lease_seconds: int | None = None) -> datetime:
    """Extend a lease (the runner's heartbeat) to now + ``lease_seconds``, by default the length the
    lease was allocated with. Refused (StaleLease) with a wrong or stale token."""
    if lease_seconds is not None:
        validate_lease_seconds(lease_seconds)
    slot_get(slot_id)
    current = Slot.objects.filter(pk=slot_id, state=St.LEASED, lease_token=lease_token)
    if lease_seconds is None:
        # The length is written once per lease, with its token: read under the same token filter,
        # it belongs to this lease (a lease from before lengths were stored keeps the old hour).
        lease_seconds = current.values_list("lease_seconds", flat=True).first() or DEFAULT_LEASE_SECONDS
    expires = timezone.now() + timedelta(seconds=lease_seconds)
    if not current.update(lease_expires_at=expires):
        raise StaleLease("lease token does not match the slot's current lease")
    return expires


# --- release -------------------------------------------------------------------------------------
def slot_release_begin(*, slot_id: int, lease_token: uuid.UUID | str) -> Slot:
    """leased -> resetting, fenced by the token; the caller resets the copy, then
    ``slot_release_finish``."""
    slot = slot_get(slot_id)
    if not Slot.objects.filter(pk=slot_id, state=St.LEASED, lease_token=lease_token).update(
        state=St.RESETTING, lease_token=None, state_changed_at=timezone.now()
    ):
        raise StaleLease("lease token does not match the slot's current lease")
    return slot


def slot_release_finish(*, slot_id: int, commit: str, broken_reason: str = "") -> Slot:
    """resetting -> free at ``commit`` (the reset worked) or broken with ``broken_reason``.
    Called by whoever moved the slot to resetting (that conditional update is the ownership)."""
    if broken_reason:
        slot_mark_broken_row(slot_id, broken_reason, from_states=[St.RESETTING])
    elif Slot.objects.filter(pk=slot_id, state=St.RESETTING).update(
        state=St.FREE, lease_holder="", lease_expires_at=None, commit=commit, needs_reset=False,
        state_changed_at=timezone.now(),
    ):  # fmt: skip
        slots_freed()
    return slot_get(slot_id)


def slot_release_remote(*, slot_id: int, token: uuid.UUID | str, commit: str, broken_reason: str = "") -> Slot:
    """A host reset its copy after a lease (or could not): leased -> free at ``commit``, or ->
    broken with ``broken_reason``. Fenced by ``token``: StaleLease, or SlotNotFound when there is
    no such slot."""
    try:
        slot_id = int(slot_id)
        token = uuid.UUID(str(token))
    except (ValueError, TypeError):
        slot_get(slot_id)  # SlotNotFound, unless only the token is malformed: it fences nothing
        raise StaleLease("lease token does not match the slot's current lease") from None
    now = timezone.now()
    slot = None
    if broken_reason:
        done = Slot.objects.filter(pk=slot_id, state=St.LEASED, lease_token=token).update(
            state=St.BROKEN, last_error=broken_reason[:10000], lease_token=None, lease_holder="",
            lease_expires_at=None, state_changed_at=now,
        )  # fmt: skip
    elif connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(_RELEASE_FREE_SQL, {"now": now, "commit": commit or "", "id": slot_id, "token": token})
            row = cursor.fetchone()
        slot = Slot.from_db(connection.alias, _SLOT_FIELDS, row) if row else None
        done = slot is not None
    else:
        fields = {"commit": commit} if commit else {}
        done = Slot.objects.filter(pk=slot_id, state=St.LEASED, lease_token=token).update(
            state=St.FREE, lease_token=None, lease_holder="", lease_expires_at=None, needs_reset=False,
            state_changed_at=now, **fields,
        )  # fmt: skip
    if not done:
        slot_get(slot_id)  # SlotNotFound before StaleLease
        raise StaleLease("lease token does not match the slot's current lease")
    slots_freed()
    return slot or slot_get(slot_id)


# --- reaping -------------------------------------------------------------------------------------
def slots_to_reap(*, host: str, now: datetime) -> list[Slot]:
    """Slots of ``host`` whose lease expired, or stuck mid-operation, each taken (-> resetting)
    by a conditional update; the caller resets each and calls ``slot_release_finish``. Rows are
    returned as they were (their ``state`` says cloning or leased)."""
    stuck_before = now - timedelta(seconds=settings.REPO_POOL_STUCK_SECONDS)
    taken = []
    candidates = Slot.objects.filter(host=host).filter(
        Q(state=St.LEASED, lease_expires_at__lt=now)
        | Q(state__in=[St.RESETTING, St.CLONING], state_changed_at__lt=stuck_before)
    )
    for slot in candidates.select_related("repository"):
        if Slot.objects.filter(
            pk=slot.pk, state=slot.state, lease_token=slot.lease_token, state_changed_at=slot.state_changed_at
        ).update(state=St.RESETTING, lease_token=None, state_changed_at=timezone.now()):
            taken.append(slot)
    return taken


def slots_reap_remote(*, now: datetime | None = None) -> list[int]:
    """Expired leases on other hosts than the server's: free again with ``needs_reset`` (the host
    resets the copy before its next use; the old holder's token is stale). A remote slot stuck
    mid-operation is freed to be made again from scratch. Returns the ids."""
    now = now or timezone.now()
    stuck_before = now - timedelta(seconds=settings.REPO_POOL_STUCK_SECONDS)
    reaped = []
    candidates = Slot.objects.exclude(host=server_host()).filter(
        Q(state=St.LEASED, lease_expires_at__lt=now)
        | Q(state__in=[St.RESETTING, St.CLONING], state_changed_at__lt=stuck_before)
    )
    for slot in candidates:
        fields: dict = {"needs_reset": True}
        if slot.state == St.CLONING or not slot.commit:
            fields = {"commit": "", "base_commit": "", "needs_reset": False}  # never made: clone again
        if Slot.objects.filter(
            pk=slot.pk, state=slot.state, lease_token=slot.lease_token, state_changed_at=slot.state_changed_at
        ).update(
            state=St.FREE, lease_token=None, lease_holder="", lease_expires_at=None, state_changed_at=timezone.now(),
            **fields,
        ):  # fmt: skip
            reaped.append(slot.pk)
    if reaped:
        slots_freed()
    return reaped
