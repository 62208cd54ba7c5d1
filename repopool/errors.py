from __future__ import annotations

from common.errors import ConflictError, DomainError, NotFoundError, UnavailableError


class NoSlotAvailable(UnavailableError):
    code = "no_slot_available"


class StaleLease(ConflictError):
    """The fencing token does not match the slot's current lease."""

    code = "stale_lease"
    field = "lease_token"


class SlotNotFound(NotFoundError):
    code = "slot_not_found"


class RepositoryNotFound(NotFoundError):
    code = "repository_not_found"
    field = "repository"


class SlotBroken(DomainError):
    code = "slot_broken"
