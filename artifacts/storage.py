"""The blob storage seam: Django's storage API (local files by default, S3 by settings).

Keys are content addresses (``sha256/ab/cd/<sha256>``): identical bytes are stored once, and a
second write of a key writes the same bytes.
"""

from __future__ import annotations

from django.core.files.storage import Storage, storages


def blob_storage() -> Storage:
    return storages["artifacts"]


def key_for(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256[2:4]}/{sha256}"


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
