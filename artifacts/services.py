"""Writing and removing artifacts: nothing partial, nothing unverified.

Bytes stream in chunks to a temporary file while sha256 and size are computed (on local disk in the
store's own ``tmp/`` folder, so the move to the key is an atomic same-filesystem rename; for an
object store under ``AGENTRUNNER_DATA_DIR/tmp``); only a complete, verified file is moved to its
final, content-addressed key, and only then is the database row created. An interrupted write
leaves at most a temporary file, which ``artifacts_gc`` removes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mimetypes
import os
import re
import shutil
import tempfile
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.core.files import File
from django.core.files.storage import FileSystemStorage
from django.db import transaction

from artifacts.errors import (
    ArtifactNotFound,
    ArtifactTooLarge,
    ChecksumMismatch,
    IncompleteUpload,
    StorageFull,
    StorageUnavailable,
)
from artifacts.models import Artifact, ArtifactKind
from artifacts.storage import blob_storage, key_for, place_local, temp_dir, walk

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A media type (RFC 6838: type and subtype of at most 127 restricted characters), no parameters: it
# fits the 255-character column and is sent back as a header, so nothing else gets through.
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\Z")


class _TempBlob(File):
    """A finished temporary file; ``temporary_file_path`` lets FileSystemStorage rename it."""

    def __init__(self, path: Path):
        super().__init__(open(path, "rb"), name=path.name)
        self._path = path

    def temporary_file_path(self) -> str:
        return str(self._path)


def sanitize_name(name: str) -> str:
    """A display filename: no folders, no control characters, bounded; never used as a path."""
    name = unicodedata.normalize("NFC", name or "")
    name = name.replace("\\", "/").split("/")[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip().strip(".")
    return name[:200] or "artifact"


def normalize_sha256(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    value = value.strip().lower()
    if not _SHA256.match(value):
        raise ChecksumMismatch("expected sha256 must be 64 hexadecimal characters")
    return value


def _chunks_of(source: BinaryIO | bytes | str | Path | Iterable[bytes]) -> Iterable[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), CHUNK):
            yield source[start : start + CHUNK]
        return
    if isinstance(source, (str, Path)):
        with open(source, "rb") as fh:
            yield from iter(lambda: fh.read(CHUNK), b"")
        return
    if hasattr(source, "read"):
        yield from iter(lambda: source.read(CHUNK), b"")
        return
    yield from source


def _spool_to_temp(
    chunks: Iterable[bytes], *, tmp_root: Path, max_size: int, expected_size: int | None
) -> tuple[Path, str, int]:
    """Write chunks to a temp file, hashing on the way. Removes the file on any failure. The file is
    flushed to disk before it is renamed to its key, so a crash cannot leave the key empty."""
    tmp_root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=tmp_root)
    path = Path(name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > max_size:
                    raise ArtifactTooLarge(f"artifact exceeds the maximum size of {max_size} bytes")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected_size is not None and size != expected_size:
            raise IncompleteUpload(f"upload ended after {size} of {expected_size} bytes")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size


def artifact_store(
    *,
    source: BinaryIO | bytes | str | Path | Iterable[bytes],
    name: str,
    kind: str = ArtifactKind.OTHER,
    content_type: str = "",
    metadata: dict | None = None,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    max_size: int | None = None,
    on_stored: Callable[[Artifact], None] | None = None,
    owner: Any = None,
) -> Artifact:
    """Store bytes from a file object, bytes, a path or an iterable of chunks.

    Guarantees: the content is streamed (never held whole in memory); a size over ``max_size``
    raises ArtifactTooLarge, a checksum other than ``expected_sha256`` raises ChecksumMismatch,
    a short stream raises IncompleteUpload, and in each case nothing is recorded and no file is
    left under a final name. ``on_stored`` runs in the transaction that creates the row (a link
    to a task, say), so the record and its links appear together or not at all.
    """
    if kind not in ArtifactKind.values:
        from common.errors import DomainError

        raise DomainError(f"unknown kind {kind!r}; one of {', '.join(ArtifactKind.values)}", field="kind")
    content_type = (content_type or "").strip()
    if content_type and not _MEDIA_TYPE.match(content_type):
        from common.errors import DomainError

        raise DomainError(
            "content type must be a media type such as text/plain (at most 255 characters, no parameters)",
            field="content_type",
        )
    expected_sha256 = normalize_sha256(expected_sha256)
    max_size = settings.ARTIFACTS_MAX_SIZE if max_size is None else max_size
    if expected_size is not None and expected_size > max_size:
        raise ArtifactTooLarge(f"artifact of {expected_size} bytes exceeds the maximum size of {max_size} bytes")
    name = sanitize_name(name)
    storage = blob_storage()
    try:
        temp, sha256, size = _spool_to_temp(
            _chunks_of(source), tmp_root=temp_dir(storage), max_size=max_size, expected_size=expected_size
        )
    except OSError as exc:
        raise storage_error(exc) from None
    try:
        if expected_sha256 and expected_sha256 != sha256:
            raise ChecksumMismatch(f"content sha256 is {sha256}, not the expected {expected_sha256}")
        key = key_for(sha256)
        # Local disk: always rename (cheap, and re-creates a blob a concurrent delete removed);
        # an object store: upload only what it does not hold yet.
        if isinstance(storage, FileSystemStorage):
            try:
                place_local(storage, temp, key)
            except OSError as exc:
                raise storage_error(exc) from None
        elif not storage.exists(key):
            blob = _TempBlob(temp)
            try:
                saved = storage.save(key, blob)
            except OSError as exc:
                raise storage_error(exc) from None
            except Exception as exc:  # an object store's client error (endpoint down, denied, ...)
                raise StorageUnavailable(
                    f"the artifact store failed: {type(exc).__name__} (nothing was stored)"
                ) from None
            finally:
                blob.close()
            if saved != key:  # a storage that renames instead of overwriting: keep its name
                key = saved
        with transaction.atomic():
            artifact = Artifact.objects.create(
                name=name,
                kind=kind,
                content_type=content_type or mimetypes.guess_type(name)[0] or "application/octet-stream",
                size=size,
                sha256=sha256,
                storage_key=key,
                metadata=metadata or {},
                owner=owner,
            )
            if on_stored is not None:
                on_stored(artifact)
    finally:
        temp.unlink(missing_ok=True)
    return artifact


def storage_error(exc: OSError) -> StorageUnavailable:
    """The refusal for a write that failed: StorageFull (507) when the disk is full, else 503."""
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return StorageFull(f"the artifact could not be written: {exc.strerror} (nothing was stored)")
    return StorageUnavailable(f"the artifact store failed: {exc.strerror or type(exc).__name__} (nothing was stored)")


def artifact_get(*, artifact_id: uuid.UUID | str) -> Artifact:
    try:
        return Artifact.objects.get(pk=artifact_id)
    except (Artifact.DoesNotExist, ValueError, TypeError):
        raise ArtifactNotFound(f"artifact {artifact_id} does not exist") from None


def artifact_open(*, artifact: Artifact):
    return blob_storage().open(artifact.storage_key, "rb")


def artifact_delete(*, artifact_id: uuid.UUID | str) -> None:
    """Delete the record; the blob goes too unless another record shares it."""
    artifact = artifact_get(artifact_id=artifact_id)
    with transaction.atomic():
        artifact.delete()
        shared = Artifact.objects.filter(storage_key=artifact.storage_key).exists()
    if not shared:
        blob_storage().delete(artifact.storage_key)


RUN_FOLDER = re.compile(r"^run-(?P<task>[0-9a-f]{32})-(?P<attempt>[0-9]{1,9})\Z")


def _newest_mtime(folder: Path) -> float:
    """The latest change in a run folder: the folder itself or any file in it (a log being written)."""
    newest = folder.lstat().st_mtime
    for entry in os.scandir(folder):
        try:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except FileNotFoundError:
            continue
    return newest


def _old_files(folder: Path, cutoff: float) -> list[Path]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        try:
            if (path.is_file() or path.is_symlink()) and path.lstat().st_mtime < cutoff:
                found.append(path)
        except FileNotFoundError:
            continue
    return found


def artifacts_gc(
    *,
    grace_seconds: int = 3600,
    dry_run: bool = False,
    attempt_running: Callable[[uuid.UUID, int], bool] | None = None,
) -> dict[str, list[str]]:
    """Remove leftovers older than the grace period (so an upload in flight, whose bytes land before
    its row, is never touched): temporary upload files (the data folder's ``tmp/`` and the local
    store's own ``tmp/``), stored blobs no record points to, and the runner's abandoned run folders
    (``tmp/run-<task>-<attempt>``, left by a runner killed mid-task) whose attempt is not running.
    ``attempt_running(task_id, number)`` says which attempts still run; without it run folders are
    left alone (this app does not read the registry)."""
    cutoff = time.time() - grace_seconds
    removed: dict[str, list[str]] = {"temporary": [], "blobs": [], "run_folders": []}
    tmp_root = Path(settings.TMP_ROOT)
    storage = blob_storage()
    temp_folders = [tmp_root]
    if isinstance(storage, FileSystemStorage):
        temp_folders.append(temp_dir(storage))
    for folder in temp_folders:
        for path in _old_files(folder, cutoff):
            removed["temporary"].append(path.name)
            if not dry_run:
                path.unlink(missing_ok=True)
    if attempt_running is not None and tmp_root.is_dir():
        for path in sorted(tmp_root.iterdir()):
            match = RUN_FOLDER.match(path.name)
            if match is None or path.is_symlink() or not path.is_dir():
                continue
            try:
                if _newest_mtime(path) >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            if attempt_running(uuid.UUID(match["task"]), int(match["attempt"])):
                continue
            removed["run_folders"].append(path.name)
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
    known = set(Artifact.objects.values_list("storage_key", flat=True))
    cutoff_dt = datetime.now(UTC) - timedelta(seconds=grace_seconds)
    for key in walk(storage):
        if key in known:
            continue
        try:
            modified = storage.get_modified_time(key)
        except (FileNotFoundError, NotImplementedError):
            continue
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=UTC)
        if modified < cutoff_dt and not Artifact.objects.filter(storage_key=key).exists():
            removed["blobs"].append(key)
            if not dry_run:
                storage.delete(key)
    return removed
