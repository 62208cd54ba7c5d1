from __future__ import annotations

from common.errors import DomainError, NotFoundError


class ChecksumMismatch(DomainError):
    code = "checksum_mismatch"
    field = "sha256"


class ArtifactTooLarge(DomainError):
    status_code = 413
    code = "too_large"


class IncompleteUpload(DomainError):
    code = "incomplete_upload"


class ArtifactNotFound(NotFoundError):
    code = "artifact_not_found"


class StorageUnavailable(DomainError):
    """The bytes could not be written (disk full, storage down); nothing was recorded."""

    status_code = 503
    code = "storage_unavailable"


class StorageFull(StorageUnavailable):
    status_code = 507
    code = "storage_full"
