from __future__ import annotations

from common import outcomes
from common.errors import ConflictError, DomainError


class TokenInvalid(DomainError):
    status_code = 401
    code = "invalid_token"


class TokenRevoked(TokenInvalid):
    code = "token_revoked"


# The attempt is not running under this lease token any more (reaped, finished, another claim):
# the caller must stop; nothing was changed. 409 lease_lost, the class the runner's ports raise.
LeaseLost = outcomes.LeaseLost


class HostTaken(ConflictError):
    code = "host_taken"
    field = "name"


class HostLimitReached(ConflictError):
    """The token has registered as many host names as it may: a new name is refused."""

    code = "host_limit_reached"
    field = "name"


class IdempotencyKeyMissing(DomainError):
    code = "idempotency_key_required"
    field = "Idempotency-Key"


class IdempotencyKeyReused(DomainError):
    status_code = 422
    code = "idempotency_key_reused"
    field = "Idempotency-Key"


class UploadNotFromTask(DomainError):
    code = "artifact_not_uploaded_by_task"
    field = "artifact_id"


class HostNotRegistered(ConflictError):
    code = "host_not_registered"
    field = "host"


class NoSlot(outcomes.NoSlotAvailable):
    """No slot of this host became free within the wait: 503 with Retry-After."""

    code = "no_slot"
    retry_after = 2
