"""The pool's errors. What a runner meets through its pool port comes from ``common.outcomes``
(re-exported here), so the in-process pool raises the same classes as the HTTP adapter."""

from __future__ import annotations

from common.errors import NotFoundError
from common.outcomes import GitError, LeaseLost, NoSlotAvailable, RefNotFound, SlotBroken

__all__ = [
    "GitError",
    "NoSlotAvailable",
    "RefNotFound",
    "RepositoryNotFound",
    "SlotBroken",
    "SlotNotFound",
    "StaleLease",
]


class StaleLease(LeaseLost):
    """The fencing token does not match the slot's current lease."""

    code = "stale_lease"
    field = "lease_token"


class SlotNotFound(NotFoundError):
    code = "slot_not_found"


class RepositoryNotFound(NotFoundError):
    code = "repository_not_found"
    field = "repository"
