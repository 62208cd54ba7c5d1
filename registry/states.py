"""The task status machine, kept in this one place.

``pending`` waits for its dependencies; ``queued`` is runnable and waits for a runner;
``running`` has an open attempt. ``succeeded``, ``failed`` and ``cancelled`` are terminal,
except that ``failed`` (and ``cancelled``) go back to ``pending`` on retry, and a ``running``
task goes back to ``pending`` after a transient failure while attempts remain.
"""

from __future__ import annotations

from django.db import models


class TaskStatus(models.TextChoices):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class FailureReason(models.TextChoices):
    IMPLEMENTATION_FAILED = "implementation_failed"
    TESTS_FAILED = "tests_failed"
    TIMEOUT = "timeout"
    GIT_ERROR = "git_error"
    WORKSPACE_ERROR = "workspace_error"
    LLM_ERROR = "llm_error"
    BUDGET_EXCEEDED = "budget_exceeded"
    CANCELLED = "cancelled"
    DEPENDENCY_FAILED = "dependency_failed"
    INFRASTRUCTURE_ERROR = "infrastructure_error"


S = TaskStatus
TRANSITIONS: dict[str, frozenset[str]] = {
    S.PENDING: frozenset({S.QUEUED, S.CANCELLED, S.FAILED}),
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED, S.PENDING}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PENDING}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset({S.PENDING}),
    S.CANCELLED: frozenset({S.PENDING}),
}
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
ACTIVE = frozenset({S.PENDING, S.QUEUED, S.RUNNING})


def can_transition(current: str, new: str) -> bool:
    return new in TRANSITIONS.get(current, frozenset())


def sources_for(new: str) -> list[str]:
    """Every status from which ``new`` may be entered (for conditional UPDATE ... WHERE)."""
    return [status for status, targets in TRANSITIONS.items() if new in targets]
