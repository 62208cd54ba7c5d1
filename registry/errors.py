from __future__ import annotations

from common.errors import ConflictError, DomainError, NotFoundError
from common.outcomes import LeaseLost


class InvalidTransition(ConflictError):
    code = "invalid_transition"


class TaskNotFound(NotFoundError):
    code = "task_not_found"


class DependencyCycle(DomainError):
    code = "dependency_cycle"
    field = "depends_on"


class AttemptLost(LeaseLost):
    """The attempt was reaped as lost; its runner must stop and not record a result."""

    code = "attempt_lost"
