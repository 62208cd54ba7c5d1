"""Every write to the task registry.

Invariants:
- A status changes only by an action of the state machine in ``registry.states`` (``_apply``,
  and ``task_claim``): one conditional UPDATE whose WHERE lists the statuses that action is
  allowed from, so two writers can never both apply a transition and a refused one (409,
  ``InvalidTransition``) changes nothing.
- A running task has exactly one open attempt; its number is the fencing token for finishing
  or requeueing it.
- Event sequence numbers are handed out under the task row's lock (``event_append``), so per task
  they only grow and never repeat, even with concurrent writers on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import uuid
from collections.abc import Iterable
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db.models import DecimalField, F, Q, Value
from django.db.models.functions import Coalesce
from django.db.models.sql import InsertQuery
from django.utils import timezone

from common.errors import DomainError
from common.events import EVENT_ITEMS_MAX, EVENT_MESSAGE_MAX, EVENT_STRING_MAX  # noqa: F401 (tests read them here)
from common.events import bounded as _bounded
from common.events import cut as _cut
from common.rows import ModelRows, bound_cursor
from registry.errors import AttemptLost, DependencyCycle, InvalidTransition, TaskNotFound
from registry.models import Attempt, AttemptOutcome, Task, TaskArtifact, TaskEvent
from registry.signals import task_queued
from registry.states import (
    FINISH_ACTIONS,
    TERMINAL,
    Action,
    FailureReason,
    TaskStatus,
    allowed,
    next_status,
    refusal,
    sources,
)

log = logging.getLogger(__name__)
S = TaskStatus
A = Action


# --- events ---------------------------------------------------------------------------------------
# Every string an event carries is cut (common.events: the bounds the remote runner applies too).
EVENT_BATCH_MAX = 1000  # events in one event_append_batch call


def _event_row(event: dict[str, Any]) -> tuple[str, str, Any]:
    """(type, message, data) of one event, bounded as event_append bounds it."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str) or not event["type"]:
        raise DomainError("each event needs a non-empty string 'type'", field="events")
    unknown = set(event) - {"type", "message", "data"}
    if unknown:
        raise DomainError(f"unknown event key(s): {', '.join(sorted(map(str, unknown)))}", field="events")
    message = event.get("message") or ""
    data = event.get("data") or {}
    if not isinstance(message, str) or not isinstance(data, dict):
        raise DomainError("an event's message is a string and its data an object", field="events")
    return event["type"][:64], _cut(message, EVENT_MESSAGE_MAX), _bounded(data)


# One statement on PostgreSQL: the UPDATE takes the task row lock (concurrent appenders queue on
# it until commit) and hands out ``n`` numbers at once; the INSERT numbers the batch from them.
_APPEND_SQL = """
WITH seq AS (
    UPDATE registry_task SET event_seq = event_seq + %(n)s WHERE id = %(task_id)s RETURNING id, event_seq
)
INSERT INTO registry_taskevent (task_id, seq, type, message, data, created_at)
SELECT seq.id, seq.event_seq - %(n)s + e.ord, e.type, e.message, e.data::jsonb, %(now)s
FROM seq, unnest(%(types)s::text[], %(messages)s::text[], %(datas)s::text[]) WITH ORDINALITY
    AS e(type, message, data, ord)
ORDER BY e.ord
RETURNING id, seq
"""


def event_append_batch(*, task_id: uuid.UUID, events: list[dict[str, Any]]) -> list[int]:
    """Append ``events`` (each ``{"type", "message"?, "data"?}``) in order; returns their ``seq``.

    The numbers are the task's next ones, consecutive, unique and increasing, whoever else
    appends at the same time. Bounded as ``event_append`` (every string cut). One statement on
    PostgreSQL; SQLite, whose writers are serialised anyway, takes the numbers then inserts.
    Refused whole (DomainError on ``events``, nothing written) when one event is malformed or
    there are more than EVENT_BATCH_MAX."""
    if not isinstance(events, (list, tuple)) or len(events) > EVENT_BATCH_MAX:
        raise DomainError(f"give a list of at most {EVENT_BATCH_MAX} events", field="events")
    return [event.seq for event in _append(task_id, [_event_row(e) for e in events])]


def event_append(*, task_id: uuid.UUID, type: str, message: str = "", data: dict[str, Any] | None = None) -> TaskEvent:
    """Append one event; its ``seq`` is the task's next number, unique and increasing. The message
    and every string in ``data`` are cut to a bound (see EVENT_MESSAGE_MAX). One round trip on
    PostgreSQL (see ``event_append_batch``)."""
    return _append(task_id, [(type[:64], _cut(message, EVENT_MESSAGE_MAX), _bounded(data or {}))])[0]


def _take_seq_sqlite(task_id: uuid.UUID, n: int) -> int | None:
    """Bump the task's event_seq by ``n`` and return the new value (None: no such task)."""
    if connection.features.can_return_rows_from_bulk_insert:  # SQLite 3.35+: RETURNING
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE registry_task SET event_seq = event_seq + %s WHERE id = %s RETURNING event_seq",
                [n, task_id.hex],
            )
            row = cursor.fetchone()
        return row[0] if row else None
    if not Task.objects.filter(pk=task_id).update(event_seq=F("event_seq") + n):
        return None
    return Task.objects.filter(pk=task_id).values_list("event_seq", flat=True).get()


def _append(task_id: uuid.UUID | str, rows: list[tuple[str, str, Any]]) -> list[TaskEvent]:
    try:
        task_id = task_id if isinstance(task_id, uuid.UUID) else uuid.UUID(str(task_id))
    except ValueError:
        raise TaskNotFound(f"task {task_id} does not exist") from None
    if not rows:
        return []
    now = timezone.now()
    n = len(rows)
    if connection.vendor == "postgresql":
        encoder = TaskEvent._meta.get_field("data").encoder
        params = {
            "n": n,
            "task_id": task_id,
            "now": now,
            "types": [r[0] for r in rows],
            "messages": [r[1] for r in rows],
            "datas": [json.dumps(r[2], cls=encoder) for r in rows],
        }
        with bound_cursor() as cursor:
            cursor.execute(_APPEND_SQL, params)
            returned = cursor.fetchall()
        if not returned:
            raise TaskNotFound(f"task {task_id} does not exist")
        returned.sort(key=lambda r: r[1])
        return [
            TaskEvent(id=pk, task_id=task_id, seq=seq, type=t, message=m, data=d, created_at=now)
            for (pk, seq), (t, m, d) in zip(returned, rows, strict=True)
        ]
    # SQLite: writers are serialised (BEGIN IMMEDIATE), so the number, read back, is ours. Inside
    # a caller's transaction no savepoint is needed: a refusal comes before anything is written.
    with contextlib.nullcontext() if connection.in_atomic_block else transaction.atomic():
        last = _take_seq_sqlite(task_id, n)
        if last is None:
            raise TaskNotFound(f"task {task_id} does not exist")
        return TaskEvent.objects.bulk_create(
            TaskEvent(task_id=task_id, seq=last - n + i, type=t, message=m, data=d, created_at=now)
            for i, (t, m, d) in enumerate(rows, start=1)
        )


# --- status machine -----------------------------------------------------------------------------
def _get(task_id: uuid.UUID | str) -> Task:
    try:
        return Task.objects.get(pk=task_id)
    except (Task.DoesNotExist, ValueError, TypeError, ValidationError):
        raise TaskNotFound(f"task {task_id} does not exist") from None


def _lock(task_id: uuid.UUID | str) -> Task:
    """The task, its row locked until the surrounding transaction ends (call inside atomic)."""
    try:
        return Task.objects.select_for_update().get(pk=task_id)
    except (Task.DoesNotExist, ValueError, TypeError, ValidationError):
        raise TaskNotFound(f"task {task_id} does not exist") from None


def _lock_all(tasks: Iterable[Task]) -> list[Task]:
    """Lock these rows in primary-key order (one order for every caller, so no deadlock)."""
    ids = {task.pk for task in tasks}
    return list(Task.objects.select_for_update().filter(pk__in=ids).order_by("pk"))


def _apply(
    task_id: uuid.UUID,
    action: Action,
    *,
    message: str = "",
    data: dict | None = None,
    where: dict[str, Any] | None = None,
    **fields: Any,
) -> Task:
    """Apply ``action`` to the task and record its ``status`` event, or refuse it.

    A refusal raises InvalidTransition (409) naming the action and the current status, and
    changes nothing. The row is locked first so the status checked, the event's ``from`` and the
    write agree; the write is still one conditional UPDATE whose WHERE lists the action's allowed
    sources (plus ``where``, a fence such as the attempt number), so a refused transition can
    never be applied, lock or not.
    """
    with transaction.atomic():
        task = _lock(task_id)
        new = next_status(action, task.status)
        if new is None:
            raise InvalidTransition(refusal(action, task.status))
        now = timezone.now()
        fields.setdefault("updated_at", now)
        if new == S.QUEUED:
            fields.setdefault("queued_at", now)
        if new in TERMINAL:
            fields.setdefault("finished_at", now)
        updated = Task.objects.filter(pk=task.pk, status__in=sources(action, new), **(where or {})).update(
            status=new, **fields
        )
        if not updated:  # the fence in ``where`` refused: a stale caller
            raise InvalidTransition(f"cannot {action} this task: it no longer matches {where}")
        if new != task.status:
            event_append(
                task_id=task.pk,
                type="status",
                message=message or f"{task.status} -> {new}",
                data={"from": task.status, "to": new, "action": str(action), **(data or {})},
            )
        if new == S.QUEUED:
            transaction.on_commit(lambda: task_queued.send(sender=Task, task_id=task.pk))
    task.refresh_from_db()
    return task


def _refuse_unless(action: Action, task: Task) -> None:
    if not allowed(action, task.status):
        raise InvalidTransition(refusal(action, task.status))


def _dependencies_satisfied(task: Task) -> bool:
    return not task.depends_on.exclude(status=S.SUCCEEDED).exists()


def _promote_if_ready(task: Task) -> Task:
    """pending -> queued when every dependency has succeeded; fail it when one cannot."""
    if task.status != S.PENDING:
        return task
    blocked = task.depends_on.filter(status__in=[S.FAILED, S.CANCELLED]).first()
    if blocked is not None:
        return _fail_for_dependency(task, blocked)
    if _dependencies_satisfied(task):
        return _apply(task.pk, A.PROMOTE)
    return task


def _fail_for_dependency(task: Task, dependency: Task) -> Task:
    task = _apply(
        task.pk,
        A.DEPENDENCY_FAILED,
        failure_reason=FailureReason.DEPENDENCY_FAILED,
        failure_message=f"dependency {dependency.pk} ({dependency.title}) {dependency.status}",
        data={"dependency": str(dependency.pk)},
    )
    _propagate_terminal(task)
    return task


def _propagate_terminal(task: Task) -> None:
    """After ``task`` ended, unblock or fail the tasks waiting for it (recursively).

    Called inside the transaction that ended ``task``, with its row locked: a dependent is locked
    after its dependency, the order every writer follows."""
    for dependent_id in task.dependents.filter(status__in=[S.PENDING, S.QUEUED]).values_list("pk", flat=True):
        dependent = _lock(dependent_id)
        try:
            if task.status == S.SUCCEEDED:
                _promote_if_ready(dependent)
            elif dependent.status in (S.PENDING, S.QUEUED):
                _fail_for_dependency(dependent, task)
        except InvalidTransition:
            pass  # it moved on meanwhile (claimed or cancelled): nothing to do


def _check_no_cycle(task: Task, depends_on: Iterable[Task]) -> None:
    seen: set[uuid.UUID] = set()
    frontier = [dep.pk for dep in depends_on]
    while frontier:
        current = frontier.pop()
        if current == task.pk:
            raise DependencyCycle("these dependencies would form a cycle")
        if current in seen:
            continue
        seen.add(current)
        frontier.extend(
            Task.depends_on.through.objects.filter(from_task_id=current).values_list("to_task_id", flat=True)
        )


# --- tasks --------------------------------------------------------------------------------------
def task_create(
    *,
    title: str,
    instructions: str,
    repository: Any,
    base_ref: str = "",
    test_command: str = "",
    priority: int = 0,
    max_attempts: int = 3,
    timeout_seconds: int = 1800,
    max_iterations: int = 3,
    llm_model: str = "",
    max_steps: int | None = None,
    max_tokens: int | None = None,
    max_cost_usd: Decimal | None = None,
    depends_on: Iterable[Task] = (),
    owner: Any = None,
    llm_config: dict | None = None,
) -> Task:
    """Create a task; it is queued at once when it has no unfinished dependency.

    Without dependencies, on PostgreSQL: one statement, the task and its two events (``created``,
    then the ``promote`` that queued it). Otherwise a handful: the dependencies locked, the task
    inserted with the status they allow, its dependency rows in one INSERT, its events in one.
    No cycle check: nothing can depend on a task that does not exist yet."""
    now = timezone.now()
    depends_on = list(depends_on)
    fields = {
        "title": title,
        "instructions": instructions,
        "repository": repository,
        "base_ref": base_ref or repository.default_branch,
        "test_command": test_command,
        "priority": priority,
        "max_attempts": max_attempts,
        "timeout_seconds": timeout_seconds,
        "max_iterations": max_iterations,
        "llm_model": llm_model,
        "llm_config": llm_config or {},
        "max_steps": max_steps,
        "max_tokens": max_tokens,
        "max_cost_usd": max_cost_usd,
        "owner": owner,
    }
    if not depends_on and connection.vendor == "postgresql":
        # Nothing to wait for: queued at once, the task and its events in one statement (atomic
        # by itself: no BEGIN and COMMIT round trips).
        status = next_status(A.PROMOTE, S.PENDING)
        events = _creation_events(repository, depends_on, status)
        task = Task(**fields, status=status, queued_at=now, event_seq=len(events))
        _insert_with_events(task, [_event_row(e) for e in events])
        _known_dependencies(task, [])
        transaction.on_commit(lambda: task_queued.send(sender=Task, task_id=task.pk))
        return task
    with transaction.atomic():
        # Lock the dependencies: one finishing now either sees this task among its dependents
        # (after we commit) or has committed before we read its status, never neither. The
        # statuses read here, under the lock, decide where the task starts.
        locked = _lock_all(depends_on)
        blocked = next((d for d in locked if d.status in (S.FAILED, S.CANCELLED)), None)
        ready = blocked is None and all(d.status == S.SUCCEEDED for d in locked)
        status = next_status(A.PROMOTE, S.PENDING) if ready else S.PENDING
        task = Task.objects.create(**fields, status=status, queued_at=now if status == S.QUEUED else None)
        if locked:
            through = Task.depends_on.through
            through.objects.bulk_create(through(from_task_id=task.pk, to_task_id=d.pk) for d in locked)
        events = _creation_events(repository, depends_on, status)
        task.event_seq = event_append_batch(task_id=task.pk, events=events)[-1]
        _known_dependencies(task, locked)
        if status == S.QUEUED:
            transaction.on_commit(lambda: task_queued.send(sender=Task, task_id=task.pk))
        if blocked is not None:
            task = _fail_for_dependency(task, blocked)
    return task


def _creation_events(repository: Any, depends_on: list[Task], status: str) -> list[dict[str, Any]]:
    """``created``, then, when the task starts queued, the ``status`` event ``_apply`` records for
    the promotion."""
    events = [
        {
            "type": "created",
            "message": f"task created for {repository.name}",
            "data": {"depends_on": [str(d.pk) for d in depends_on]},
        }
    ]
    if status != S.PENDING:
        events.append(
            {
                "type": "status",
                "message": f"{S.PENDING} -> {status}",
                "data": {"from": S.PENDING, "to": status, "action": str(A.PROMOTE)},
            }
        )
    return events


def _insert_with_events(task: Task, rows: list[tuple[str, str, Any]]) -> None:
    """PostgreSQL: INSERT ``task`` (as ``save`` would: the ORM compiles it, auto_now fields filled)
    and its first events, numbered from 1, in one statement."""
    fields = Task._meta.local_concrete_fields
    # What the ORM's insert compiler does for each field: pre_save (auto_now), then prepare (with
    # the connection itself: every attribute read through the ``connection`` proxy costs a lookup).
    db = connections[DEFAULT_DB_ALIAS]
    insert_params = [field.get_db_prep_save(field.pre_save(task, True), db) for field in fields]
    encoder = TaskEvent._meta.get_field("data").encoder
    params = [
        *insert_params,
        task.created_at,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [json.dumps(r[2], cls=encoder) for r in rows],
    ]
    with bound_cursor() as cursor:
        cursor.execute(_task_insert_sql(), params)
    task._state.adding = False
    task._state.db = connection.alias


@functools.cache
def _task_insert_sql() -> str:
    """The statement of ``_insert_with_events``, compiled once by the ORM (with placeholders only:
    no field of Task brings a placeholder of its own, which the check below keeps true)."""
    fields = Task._meta.local_concrete_fields
    assert not any(hasattr(field, "get_placeholder") for field in fields), "a field with its own placeholder"
    query = InsertQuery(Task)
    query.insert_values(fields, [Task(repository_id=0)])
    ((insert_sql, _),) = query.get_compiler(connection=connection).as_sql()
    return (
        f"WITH new AS ({insert_sql} RETURNING id) "
        "INSERT INTO registry_taskevent (task_id, seq, type, message, data, created_at) "
        "SELECT new.id, e.ord, e.type, e.message, e.data::jsonb, %s "
        "FROM new, unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS e(type, message, data, ord)"
    )


def _known_dependencies(task: Task, dependencies: list[Task]) -> None:
    """What ``prefetch_related("depends_on")`` would leave on a task we just wrote: its serializer
    reads the dependencies without another query."""
    known = task.depends_on.all()
    known._result_cache = list(dependencies)
    known._prefetch_done = True
    task._prefetched_objects_cache = {"depends_on": known}


def task_set_dependencies(*, task_id: uuid.UUID, depends_on: Iterable[Task]) -> Task:
    """Replace the dependencies of a pending or queued task (409 otherwise); refuses cycles.

    A queued task whose new dependencies are not all done goes back to pending."""
    depends_on = list(depends_on)
    with transaction.atomic():
        task_id = _get(task_id).pk
        _lock_all(depends_on)  # dependencies before dependents, as _propagate_terminal locks
        task = _lock(task_id)
        _refuse_unless(A.SET_DEPENDENCIES, task)
        _check_no_cycle(task, depends_on)
        task.depends_on.set(depends_on)
        event_append(task_id=task.pk, type="dependencies", data={"depends_on": [str(d.pk) for d in depends_on]})
        if task.status == S.QUEUED and not _dependencies_satisfied(task):
            task = _apply(task.pk, A.SET_DEPENDENCIES, message="waiting for new dependencies")
        return _promote_if_ready(task)


def task_cancel(*, task_id: uuid.UUID | str, reason: str = "cancelled by request") -> Task:
    """Cancel a pending or queued task at once; ask a running one to stop; refuse a finished one.

    The request on a running task is recorded once (``cancel_requested``, one event); asking
    again changes nothing. It is never lost: that attempt's end, whatever the runner reports
    short of success, ends the task cancelled (see ``task_finish`` and ``attempts_reap_lost``).
    """
    with transaction.atomic():
        task = _lock(task_id)
        _refuse_unless(A.CANCEL, task)
        if next_status(A.CANCEL, task.status) == task.status:  # running: a request, not a move
            if not task.cancel_requested:
                Task.objects.filter(pk=task.pk, status__in=sources(A.CANCEL, task.status)).update(
                    cancel_requested=True, updated_at=timezone.now()
                )
                event_append(task_id=task.pk, type="cancel_requested", message=reason)
        else:
            task = _apply(
                task.pk, A.CANCEL, failure_reason=FailureReason.CANCELLED, failure_message=reason, message=reason
            )
            _propagate_terminal(task)
    task.refresh_from_db()
    return task


def task_retry(*, task_id: uuid.UUID | str) -> Task:
    """Send a failed or cancelled task back to pending (and its dependency-failed dependents).

    Refused (409, nothing changed) for any other status: a pending, queued or running task is
    already on its way, and a succeeded one is done."""
    with transaction.atomic():
        task = _lock(task_id)
        _refuse_unless(A.RETRY, task)
        task = _apply(
            task.pk,
            A.RETRY,
            failure_reason="",
            failure_message="",
            cancel_requested=False,
            finished_at=None,
            # A manual retry always grants at least one more attempt.
            max_attempts=max(task.max_attempts, task.attempts_count + 1),
            message="retry requested",
        )
        for dependent in task.dependents.filter(status=S.FAILED, failure_reason=FailureReason.DEPENDENCY_FAILED):
            task_retry(task_id=dependent.pk)
        task = _promote_if_ready(task)
    return task


def task_is_cancel_requested(*, task_id: uuid.UUID) -> bool:
    return Task.objects.filter(pk=task_id, cancel_requested=True).exists()


# --- claiming and attempts ----------------------------------------------------------------------
# The attempt's columns at claim besides task and number. The runner API's lease token joins
# them here (``lease_token``, a fresh UUID per claim; see ``_attempt_values``).
_ATTEMPT_COLUMNS = ("runner_id", "started_at", "heartbeat_at", "outcome", "failure_reason", "message", "metrics")


def _attempt_values(runner_id: str, now) -> dict[str, Any]:
    values = {
        "runner_id": runner_id,
        "started_at": now,
        "heartbeat_at": now,
        "outcome": AttemptOutcome.RUNNING.value,
        "failure_reason": "",
        "message": "",
        "metrics": "{}",
    }
    if _HAS_LEASE_TOKEN:
        values["lease_token"] = uuid.uuid4()
    return values


_HAS_LEASE_TOKEN = any(f.name == "lease_token" for f in Attempt._meta.concrete_fields)
if _HAS_LEASE_TOKEN:
    _ATTEMPT_COLUMNS += ("lease_token",)


# A task that brings its own model (a recorded transcript it replays): what a runner with no live
# model may claim (``replay_only``).
_REPLAYS = {"provider": "replay"}


@functools.cache
def _claim_sql(named: bool, replay_only: bool = False) -> str:
    """The claim as one PostgreSQL statement: pick and lock the next runnable row (skipping rows
    other claimers hold), move it to running, open its attempt and record its ``claimed`` event
    (its number taken in the same UPDATE). Every value comes from a parameter or from the row."""
    (queued,) = sources(A.CLAIM)  # one claimable status: the partial index ``task_runnable`` covers it
    running = next_status(A.CLAIM, queued)
    task_columns = ", ".join(f"t.{f.column}" for f in Task._meta.concrete_fields)
    attempt_columns = ", ".join(_ATTEMPT_COLUMNS)
    attempt_values = ", ".join(f"%(a_{c})s" for c in _ATTEMPT_COLUMNS)
    return f"""
WITH claimed AS (
    UPDATE registry_task t
    SET status = '{running}', attempts_count = t.attempts_count + 1, event_seq = t.event_seq + 1,
        started_at = %(now)s, updated_at = %(now)s, failure_reason = '', failure_message = ''
    WHERE t.id = (
        SELECT c.id FROM registry_task c
        WHERE c.status = '{queued}' {"AND c.id = %(task_id)s" if named else ""}
            {"AND c.llm_config @> %(replays)s::jsonb" if replay_only else ""}
        ORDER BY c.priority DESC, c.created_at
        LIMIT 1 FOR UPDATE SKIP LOCKED
    ) AND t.status = '{queued}'
    RETURNING {task_columns}
), attempt AS (
    INSERT INTO registry_attempt (task_id, number, {attempt_columns})
    SELECT claimed.id, claimed.attempts_count, {attempt_values} FROM claimed
    RETURNING id
), event AS (
    INSERT INTO registry_taskevent (task_id, seq, type, message, data, created_at)
    SELECT claimed.id, claimed.event_seq, 'claimed',
           'claimed by ' || %(runner_id)s::text || ' (attempt ' || claimed.attempts_count || ')',
           jsonb_build_object('runner_id', %(runner_id)s::text, 'attempt', claimed.attempts_count,
                              'from', '{queued}', 'to', '{running}'),
           %(now)s
    FROM claimed
)
SELECT claimed.*, attempt.id AS claimed_attempt_id FROM claimed, attempt
"""


def task_claim(
    *, runner_id: str, task_id: uuid.UUID | str | None = None, replay_only: bool = False
) -> tuple[Task, Attempt] | None:
    """Claim the next runnable task (highest priority, then oldest), or the one named.

    ``replay_only``: only a task that replays a recorded transcript (its own ``llm_config``
    provider), for a runner with no live model: a task that needs one stays queued for others
    instead of being claimed and given back (which would cost it an attempt).

    Returns None when nothing is runnable. Concurrency: on PostgreSQL one statement
    (``_claim_sql``) picks the row with ``SELECT ... FOR UPDATE SKIP LOCKED`` and moves it with an
    UPDATE that re-checks its status, opening the attempt and recording the event with it, so no two
    runners get one task and a claim is one round trip. SQLite serialises writers with BEGIN
    IMMEDIATE and takes the same steps one by one.
    """
    if task_id is not None:
        named = _get(task_id)
        _refuse_unless(A.CLAIM, named)
        task_id = named.pk
    if connection.vendor == "postgresql":
        return _claim_postgresql(runner_id, task_id, replay_only)
    return _claim_portable(runner_id, task_id, replay_only)


def _claim_params(runner_id: str, task_id: uuid.UUID | None) -> dict[str, Any]:
    now = timezone.now()
    values = _attempt_values(runner_id, now)
    return {"now": now, "runner_id": runner_id, "task_id": task_id, **{f"a_{k}": v for k, v in values.items()}}


_TASK_ROWS = ModelRows(Task)


def _claim_postgresql(runner_id: str, task_id: uuid.UUID | None, replay_only: bool) -> tuple[Task, Attempt] | None:
    params = _claim_params(runner_id, task_id)
    replay_only = replay_only and task_id is None  # a task named is claimed as it is (it says why not later)
    if replay_only:
        params["replays"] = json.dumps(_REPLAYS)
    with bound_cursor() as cursor:
        cursor.execute(_claim_sql(task_id is not None, replay_only), params)
        row = cursor.fetchone()
    if row is None:
        return None
    # The row is the task's columns in field order, then the attempt's id (see _claim_sql); built
    # as the ORM would build it, without a RawQuerySet's per-call column mapping (most of a
    # claim's Python time).
    task = _TASK_ROWS.instance(row[:-1])
    values = {column: params[f"a_{column}"] for column in _ATTEMPT_COLUMNS}
    values.update(id=row[-1], task_id=task.pk, number=task.attempts_count, slot_id=None, finished_at=None, metrics={})
    attempt = Attempt.from_db(DEFAULT_DB_ALIAS, _ATTEMPT_ATTNAMES, [values[name] for name in _ATTEMPT_ATTNAMES])
    Attempt.task.field.set_cached_value(attempt, task)
    return task, attempt


_ATTEMPT_ATTNAMES = [field.attname for field in Attempt._meta.concrete_fields]


def _claim_portable(runner_id: str, task_id: uuid.UUID | None, replay_only: bool) -> tuple[Task, Attempt] | None:
    claimable = sources(A.CLAIM)
    with transaction.atomic():
        candidates = Task.objects.filter(status__in=claimable)
        if task_id is not None:
            candidates = candidates.filter(pk=task_id)
        elif replay_only:
            candidates = candidates.filter(llm_config__provider=_REPLAYS["provider"])
        task = candidates.order_by("-priority", "created_at").select_for_update(skip_locked=True).first()
        if task is None:
            return None
        now = timezone.now()
        number = task.attempts_count + 1
        new = next_status(A.CLAIM, task.status)
        updated = Task.objects.filter(pk=task.pk, status__in=claimable).update(
            status=new,
            attempts_count=number,
            started_at=now,
            updated_at=now,
            failure_reason="",
            failure_message="",
        )
        if not updated:
            return None
        values = _attempt_values(runner_id, now)
        values["metrics"] = {}
        attempt = Attempt.objects.create(task=task, number=number, **values)
        event_append(
            task_id=task.pk,
            type="claimed",
            message=f"claimed by {runner_id} (attempt {number})",
            data={"runner_id": runner_id, "attempt": number, "from": task.status, "to": new},
        )
    task.refresh_from_db()
    return task, attempt


def attempt_update(*, attempt_id: int, slot_id: int | None = None, metrics: dict | None = None) -> None:
    """Record the attempt's slot or merge metrics; doubles as its heartbeat.

    Raises AttemptLost when the attempt is no longer running (reaped as lost): its runner must stop.
    """
    fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if slot_id is not None:
        fields["slot_id"] = slot_id
    with transaction.atomic():
        if metrics:
            attempt = Attempt.objects.select_for_update().get(pk=attempt_id)
            fields["metrics"] = {**attempt.metrics, **metrics}
        if not Attempt.objects.filter(pk=attempt_id, outcome=AttemptOutcome.RUNNING).update(**fields):
            raise AttemptLost(f"attempt {attempt_id} is no longer running (it was reaped as lost)")


def task_add_usage(*, task_id: uuid.UUID, prompt_tokens: int, completion_tokens: int, cost_usd: Decimal | None) -> None:
    """Add one LLM call's usage to the task's totals; a call of unknown cost marks the total unknown."""
    fields: dict[str, Any] = {
        "prompt_tokens": F("prompt_tokens") + prompt_tokens,
        "completion_tokens": F("completion_tokens") + completion_tokens,
    }
    if cost_usd is None:
        fields["cost_unknown"] = True
    else:
        fields["cost_usd"] = Coalesce(F("cost_usd"), Value(Decimal(0)), output_field=DecimalField()) + Value(
            Decimal(cost_usd), output_field=DecimalField()
        )
    Task.objects.filter(pk=task_id).update(**fields)


def _end_attempt(
    task: Task, attempt: Attempt, action: Action, *, message: str = "", data: dict | None = None, **fields: Any
) -> Task:
    """Move ``task`` out of running for the end of ``attempt``: requeue (then queue it again when
    its dependencies allow) or finish (then unblock or fail its dependents).

    Called with the task row locked. The attempt number is the fencing token: the UPDATE applies
    only while this attempt is still the task's current one."""
    task = _apply(task.pk, action, message=message, data=data, where={"attempts_count": attempt.number}, **fields)
    if action == A.REQUEUE:
        return _promote_if_ready(task)
    _propagate_terminal(task)
    return task


def _cancelled_fields(attempt: Attempt, detail: str) -> dict[str, Any]:
    return {
        "failure_reason": FailureReason.CANCELLED,
        "failure_message": "cancelled by request",
        "message": f"cancelled by request (attempt {attempt.number} {detail})",
        "data": {"reason": FailureReason.CANCELLED, "attempt": attempt.number},
    }


def task_finish(
    *,
    task_id: uuid.UUID,
    attempt_id: int,
    status: str,
    failure_reason: str = "",
    message: str = "",
    retry: bool = False,
    result: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Task:
    """End the task's running attempt.

    ``status`` is succeeded, failed or cancelled. With ``retry`` (a transient failure) the task goes
    back to pending and is queued again while attempts remain; otherwise it ends in ``status``.
    When a cancel was requested, any outcome but ``succeeded`` ends the task cancelled (the
    attempt keeps what the runner reported). Raises AttemptLost, recording nothing, when the
    attempt is not the task's open one (it was reaped, or belongs to another task).
    """
    if status not in FINISH_ACTIONS:
        raise DomainError(f"must be one of {', '.join(FINISH_ACTIONS)}, not {status!r}", field="status")
    result = result or {}
    outcome = {S.SUCCEEDED: AttemptOutcome.SUCCEEDED, S.CANCELLED: AttemptOutcome.CANCELLED}.get(
        status, AttemptOutcome.FAILED
    )
    with transaction.atomic():
        # Lock order, as the reaper: the task row, then the attempt row. Holding the task row
        # means a cancel request either landed before we read cancel_requested or waits for us
        # (and then finds the task no longer running).
        task = _lock(task_id)
        attempt = Attempt.objects.select_for_update().filter(pk=attempt_id, task_id=task.pk).first()
        if attempt is None:
            raise AttemptLost(f"attempt {attempt_id} is not an attempt of task {task.pk}: its result is discarded")
        if attempt.outcome != AttemptOutcome.RUNNING or task.attempts_count != attempt.number:
            # Fencing: a runner whose attempt was reaped as lost must not finish the task, which
            # may be running again under a newer attempt.
            raise AttemptLost(f"attempt {attempt.number} is {attempt.outcome}, not running: its result is discarded")
        requeue = retry and status == S.FAILED and task.attempts_count < task.max_attempts and not task.cancel_requested
        Attempt.objects.filter(pk=attempt_id).update(
            finished_at=timezone.now(),
            outcome=AttemptOutcome.RETRY if requeue else outcome,
            failure_reason=failure_reason,
            message=message[:10000],
            metrics={**attempt.metrics, **(metrics or {})},
        )
        result_fields = {
            key: result[key]
            for key in ("result_branch", "result_commit", "result_fetch", "tests_passed", "test_results", "summary")
            if key in result
        }
        if task.cancel_requested and status != S.SUCCEEDED:
            detail = f"ended {status}" + (f": {failure_reason}" if failure_reason else "")
            return _end_attempt(
                task, attempt, A.FINISH_CANCELLED, **_cancelled_fields(attempt, detail), **result_fields
            )
        if requeue:
            return _end_attempt(
                task,
                attempt,
                A.REQUEUE,
                failure_reason=failure_reason,
                failure_message=message,
                message=f"attempt {attempt.number} failed ({failure_reason}); retrying",
                data={"reason": failure_reason},
                **result_fields,
            )
        return _end_attempt(
            task,
            attempt,
            FINISH_ACTIONS[status],
            failure_reason=failure_reason if status != S.SUCCEEDED else "",
            failure_message=message if status != S.SUCCEEDED else "",
            message=message,
            data={"reason": failure_reason} if failure_reason else None,
            **result_fields,
        )


def attempts_reap_lost(*, stale_after_seconds: int) -> list[Attempt]:
    """Mark running attempts without a heartbeat for ``stale_after_seconds`` as lost.

    Their tasks are cancelled when a cancel was requested, else go back to pending (queued again)
    while attempts remain, else fail with ``infrastructure_error``.
    """
    cutoff = timezone.now() - timedelta(seconds=stale_after_seconds)
    stale = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    lost = list(Attempt.objects.filter(stale, outcome=AttemptOutcome.RUNNING, task__status=S.RUNNING))
    reaped = []
    for attempt in lost:
        with transaction.atomic():
            task = _lock(attempt.task_id)  # the task row first, as task_finish
            # Re-checked under the lock: a heartbeat or a finish since the listing wins.
            if not Attempt.objects.filter(stale, pk=attempt.pk, outcome=AttemptOutcome.RUNNING).update(
                outcome=AttemptOutcome.LOST, finished_at=timezone.now(), message="runner stopped heartbeating"
            ):
                continue
            event_append(task_id=task.pk, type="attempt_lost", message=f"attempt {attempt.number} lost: no heartbeat")
            if task.cancel_requested:
                _end_attempt(task, attempt, A.FINISH_CANCELLED, **_cancelled_fields(attempt, "was lost"))
            elif task.attempts_count < task.max_attempts:
                _end_attempt(task, attempt, A.REQUEUE, message="attempt lost; retrying")
            else:
                _end_attempt(
                    task,
                    attempt,
                    A.FINISH_FAILED,
                    failure_reason=FailureReason.INFRASTRUCTURE_ERROR,
                    failure_message="the runner was lost and no attempts remain",
                )
        reaped.append(attempt)
    return reaped


def tasks_requeue_stale(*, older_than_seconds: int) -> list[uuid.UUID]:
    """Tasks queued longer than this: send the signal again so a lost broker message is replaced."""
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    ids = list(Task.objects.filter(status=S.QUEUED, queued_at__lt=cutoff).values_list("pk", flat=True))
    for task_id in ids:
        Task.objects.filter(pk=task_id, status=S.QUEUED).update(queued_at=timezone.now())
        task_queued.send(sender=Task, task_id=task_id)
    return ids


def task_link_artifact(
    *, task_id: uuid.UUID, artifact_id: uuid.UUID, role: str = "", attempt_number: int | None = None
) -> TaskArtifact:
    """Link a stored artifact to a task, idempotently. Without ``attempt_number`` the attempt is
    the one the artifact's metadata names (a runner's artifacts carry ``attempt``; a spooled one
    of an earlier attempt keeps its own), when the task has had that many attempts."""
    task = _get(task_id)
    if attempt_number is None:
        from artifacts.models import Artifact

        named = (Artifact.objects.filter(pk=artifact_id).values_list("metadata", flat=True).first() or {}).get(
            "attempt"
        )
        if isinstance(named, int) and not isinstance(named, bool) and task.attempts.filter(number=named).exists():
            attempt_number = named
    link, _ = TaskArtifact.objects.get_or_create(
        task_id=task_id, artifact_id=artifact_id, role=role, defaults={"attempt_number": attempt_number}
    )
    return link


# --- used by the runner API and the artifact upload endpoint ------------------------------------
def task_artifact_link_check(*, task_id: uuid.UUID, user: Any) -> None:
    """Refuse (400, field ``task``) to attach an artifact to a task ``user`` may not see: another
    user's task is as unknown as a missing one. Checked before an upload stores any byte."""
    from registry.selectors import tasks_visible_to

    if not tasks_visible_to(user).filter(pk=task_id).exists():
        raise DomainError(f"Unknown task {task_id}.", field="task")


def task_artifact_link(
    *, task_id: uuid.UUID, artifact_id: uuid.UUID, role: str = "", attempt_number: int | None = None
) -> TaskArtifact:
    """Link a stored artifact to a task under ``role``; linking the same again changes nothing."""
    return task_link_artifact(task_id=task_id, artifact_id=artifact_id, role=role, attempt_number=attempt_number)
