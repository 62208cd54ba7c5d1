"""Domain errors shared by every app. The API maps each class to one HTTP status."""

from __future__ import annotations


class DomainError(Exception):
    """A refusal with a reason; the API answers 400 unless a subclass says otherwise."""

    status_code = 400
    code = "invalid"
    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if field is not None:
            self.field = field
        if code is not None:
            self.code = code


class NotFoundError(DomainError):
    status_code = 404
    code = "not_found"


class PermissionDenied(DomainError):
    """Known to the caller, but not theirs to do (a 403); for what they may not see, use NotFound."""

    status_code = 403
    code = "permission_denied"


class ConflictError(DomainError):
    status_code = 409
    code = "conflict"


class UnavailableError(DomainError):
    """Try again later (no capacity right now); the API adds Retry-After."""

    status_code = 503
    code = "unavailable"
    retry_after = 5
