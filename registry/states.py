"""The task state machine, kept in this one place and keyed by *action*, not by target status.

``pending`` waits for its dependencies; ``queued`` is runnable and waits for a runner;
``running`` has exactly one open attempt. ``succeeded``, ``failed`` and ``cancelled`` are terminal
(only a user's retry brings ``failed`` or ``cancelled`` back).

Two actions may reach the same status from the same source and still mean different things:
a runner's requeue after a transient failure moves ``running -> pending``, while a user's retry
must never touch a running task. Keying the table by (action, current status) keeps them apart:
whatever pair is not in ``MACHINE`` is refused with ``InvalidTransition`` (409) and changes
nothing.

Who may take each action:

- ``claim`` (a runner): queued -> running, opening attempt N+1.
- ``requeue`` (the runner of the open attempt, through ``task_finish(retry=True)``, or the
  reaper for a lost attempt): running -> pending, then ``promote``. Fenced by the attempt.
- ``finish_succeeded`` / ``finish_failed`` / ``finish_cancelled`` (the runner of the open attempt,
  or the reaper): running -> succeeded / failed / cancelled. Fenced by the attempt.
- ``retry`` (a user): failed or cancelled -> pending, then ``promote``; clears ``cancel_requested``.
- ``cancel`` (a user): pending or queued -> cancelled at once; running -> running with
  ``cancel_requested`` set (the runner honours it); terminal -> refused.
- ``promote`` (internal): pending -> queued when every dependency has succeeded.
- ``dependency_failed`` (internal): pending or queued -> failed when a dependency cannot succeed.
- ``set_dependencies`` (a user): allowed on pending or queued tasks; a queued task whose new
  dependencies are not all done goes back to pending (one that is still runnable stays queued).

A cancel request is never lost: once ``cancel_requested`` is set on a running task, the attempt's
next outcome ends the task ``cancelled`` (a failure, a transient failure asking for a requeue, or
the attempt being reaped as lost). The one exception is an attempt that reports ``succeeded``:
its work is done and recorded, so the task ends ``succeeded``; a cancel cannot undo finished
work. Only a retry, allowed on failed or cancelled tasks, clears the request.
"""

from __future__ import annotations

from enum import StrEnum

from django.db import models

from common.outcomes import Reason


class TaskStatus(models.TextChoices):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# The values come from the one outcome vocabulary (common.outcomes.Reason).
FailureReason = models.TextChoices("FailureReason", [(reason.name, reason.value) for reason in Reason])


class Action(StrEnum):
    CLAIM = "claim"
    REQUEUE = "requeue"
    FINISH_SUCCEEDED = "finish_succeeded"
    FINISH_FAILED = "finish_failed"
    FINISH_CANCELLED = "finish_cancelled"
    RETRY = "retry"
    CANCEL = "cancel"
    PROMOTE = "promote"
    DEPENDENCY_FAILED = "dependency_failed"
    SET_DEPENDENCIES = "set_dependencies"


S = TaskStatus
A = Action

# (action, current status) -> new status. Everything not listed is refused.
MACHINE: dict[tuple[Action, str], str] = {
    (A.CLAIM, S.QUEUED): S.RUNNING,
    (A.REQUEUE, S.RUNNING): S.PENDING,
    (A.FINISH_SUCCEEDED, S.RUNNING): S.SUCCEEDED,
    (A.FINISH_FAILED, S.RUNNING): S.FAILED,
    (A.FINISH_CANCELLED, S.RUNNING): S.CANCELLED,
    (A.RETRY, S.FAILED): S.PENDING,
    (A.RETRY, S.CANCELLED): S.PENDING,
    (A.CANCEL, S.PENDING): S.CANCELLED,
    (A.CANCEL, S.QUEUED): S.CANCELLED,
    (A.CANCEL, S.RUNNING): S.RUNNING,  # a request only: cancel_requested, honoured by the runner
    (A.PROMOTE, S.PENDING): S.QUEUED,
    (A.DEPENDENCY_FAILED, S.PENDING): S.FAILED,
    (A.DEPENDENCY_FAILED, S.QUEUED): S.FAILED,
    (A.SET_DEPENDENCIES, S.PENDING): S.PENDING,
    (A.SET_DEPENDENCIES, S.QUEUED): S.PENDING,  # only when the new dependencies are not all done
}

# How a refusal names the action: (verb, past participle).
_WORDS: dict[Action, tuple[str, str]] = {
    A.CLAIM: ("claim", "claimed"),
    A.REQUEUE: ("requeue", "requeued"),
    A.FINISH_SUCCEEDED: ("finish", "finished"),
    A.FINISH_FAILED: ("finish", "finished"),
    A.FINISH_CANCELLED: ("finish", "finished"),
    A.RETRY: ("retry", "retried"),
    A.CANCEL: ("cancel", "cancelled"),
    A.PROMOTE: ("queue", "queued"),
    A.DEPENDENCY_FAILED: ("fail for a dependency", "failed for a dependency"),
    A.SET_DEPENDENCIES: ("change the dependencies of", "given new dependencies"),
}

TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
ACTIVE = frozenset({S.PENDING, S.QUEUED, S.RUNNING})
FINISH_ACTIONS: dict[str, Action] = {
    S.SUCCEEDED: A.FINISH_SUCCEEDED,
    S.FAILED: A.FINISH_FAILED,
    S.CANCELLED: A.FINISH_CANCELLED,
}


def allowed(action: Action, current: str) -> bool:
    return (action, current) in MACHINE


def next_status(action: Action, current: str) -> str | None:
    """The status ``action`` leads to from ``current``, or None when it is refused."""
    return MACHINE.get((action, current))


def sources(action: Action, new: str | None = None) -> list[str]:
    """Every status from which ``action`` is allowed (leading to ``new`` when given): the WHERE of
    the conditional UPDATE that applies it."""
    return [status for (act, status), target in MACHINE.items() if act == action and new in (None, target)]


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def refusal(action: Action, current: str) -> str:
    """Why ``action`` is refused on a ``current`` task, e.g. "cannot retry a running task: only
    failed or cancelled tasks can be retried"."""
    verb, participle = _WORDS[action]
    return f"cannot {verb} a {current} task: only {_join(sources(action))} tasks can be {participle}"
