"""The blob storage seam: Django's storage API (local files by default, S3 by settings).

Keys are content addresses (``sha256/ab/cd/<sha256>``): identical bytes are stored once, and a
second write of a key writes the same bytes.

A key never names a partial file: on local disk, uploads are written under the store's own
``tmp/`` folder (same filesystem as the keys) and renamed into place; should a rename fail anyway
(another filesystem mounted under the root), the bytes are copied to a temporary name beside the key
and that is renamed. Django's own ``file_move_safe`` would copy straight into the final name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from django.conf import settings
from django.core.files.storage import FileSystemStorage, Storage, storages

CHUNK = 1024 * 1024
TEMP_FOLDER = "tmp"  # inside a local store's root; never under the ``sha256/`` keys


def blob_storage() -> Storage:
    return storages["artifacts"]


def key_for(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def temp_dir(storage: Storage) -> Path:
    """Where an upload is written before it has a key: the local store's own ``tmp/`` (so the final
    move is a same-filesystem, atomic rename), else the data folder's ``tmp/`` (an object store
    uploads from it)."""
    if isinstance(storage, FileSystemStorage):
        return Path(storage.location) / TEMP_FOLDER
    return Path(settings.TMP_ROOT)


def place_local(storage: FileSystemStorage, temp: Path, key: str) -> None:
    """Move the finished file ``temp`` to ``key``, replacing a file there (same bytes, by content
    address). Either the key names the complete file afterwards, or this raises and the key is as
    it was; ``temp`` is the caller's to remove."""
    final = Path(storage.path(key))
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(temp, final)
    except FileNotFoundError:
        raise
    except OSError:
        partial = final.parent / f".{final.name}.{uuid.uuid4().hex}.part"
        try:
            with open(temp, "rb") as source, open(partial, "xb") as target:
                shutil.copyfileobj(source, target, CHUNK)
                target.flush()
                os.fsync(target.fileno())
            os.replace(partial, final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    if storage.file_permissions_mode is not None:
        os.chmod(final, storage.file_permissions_mode)


def walk(storage: Storage, prefix: str = "sha256"):
    """Every key under ``prefix`` (works for local and S3 storages)."""
    try:
        dirs, files = storage.listdir(prefix)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in files:
        yield f"{prefix}/{name}"
    for name in dirs:
        yield from walk(storage, f"{prefix}/{name}")
