"""A key never names a partial file: uploads are written beside the store and renamed into place;
a copy (when a rename cannot be done) goes to a temporary name first."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from artifacts import services
from artifacts.errors import StorageFull
from artifacts.models import Artifact
from artifacts.storage import key_for

pytestmark = pytest.mark.django_db

LIMIT = 1024 * 1024


def all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


@contextmanager
def renames_cross_a_filesystem(monkeypatch, *, then_disk_full: bool):
    """Renames between folders fail with EXDEV, as between two filesystems (renames within one
    folder still work). With ``then_disk_full``, the failed rename also caps file sizes at 1 MiB
    (RLIMIT_FSIZE, the signal ignored), so the copy that follows runs out of room halfway."""
    real_rename, real_replace = os.rename, os.replace
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.getsignal(signal.SIGXFSZ)

    def guarded(real):
        def move(src, dst, *args, **kwargs):
            if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
                if then_disk_full:
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src)
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "rename", guarded(real_rename))
    monkeypatch.setattr(os, "replace", guarded(real_replace))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
        monkeypatch.undo()


def test_upload_is_written_inside_the_store_then_renamed(isolated_data_dir):
    seen: list[tuple[Path, int]] = []

    def chunks():
        yield b"a" * 1000
        seen.extend((p, p.stat().st_ino) for p in all_files(isolated_data_dir / "artifacts"))
        yield b"b" * 1000

    artifact = services.artifact_store(source=chunks(), name="x.bin")
    [(temporary, inode)] = seen  # mid-upload the store's folder holds only the temporary file
    assert temporary.parent == isolated_data_dir / "artifacts" / "tmp"
    assert all_files(isolated_data_dir / "tmp") == []
    final = isolated_data_dir / "artifacts" / key_for(artifact.sha256)
    assert all_files(isolated_data_dir / "artifacts") == [final]
    assert final.stat().st_ino == inode  # renamed into place, not copied
    assert final.read_bytes() == b"a" * 1000 + b"b" * 1000


def test_failed_copy_leaves_nothing_under_the_final_key(monkeypatch, isolated_data_dir):
    data = os.urandom(3 * LIMIT)
    final = isolated_data_dir / "artifacts" / key_for(hashlib.sha256(data).hexdigest())
    with renames_cross_a_filesystem(monkeypatch, then_disk_full=True), pytest.raises(StorageFull) as refused:
        services.artifact_store(source=data, name="big.bin")
    assert "nothing was stored" in refused.value.message
    assert not final.exists(), f"a partial blob of {final.stat().st_size} bytes is left under the key"
    assert all_files(isolated_data_dir / "artifacts") == [] and all_files(isolated_data_dir / "tmp") == []
    assert Artifact.objects.count() == 0


def test_copy_fallback_stores_the_whole_file_and_no_temporary_name(monkeypatch, isolated_data_dir):
    data = os.urandom(3 * LIMIT)
    with renames_cross_a_filesystem(monkeypatch, then_disk_full=False):
        artifact = services.artifact_store(source=data, name="big.bin")
    final = isolated_data_dir / "artifacts" / key_for(artifact.sha256)
    assert final.read_bytes() == data
    assert all_files(isolated_data_dir / "artifacts") == [final]


def test_api_upload_with_the_disk_full_at_the_final_move_is_507_and_leaves_nothing(api, monkeypatch, isolated_data_dir):
    data = os.urandom(3 * LIMIT)
    with renames_cross_a_filesystem(monkeypatch, then_disk_full=True):
        response = api.generic("POST", "/api/artifacts/?name=big.bin", data, content_type="application/octet-stream")
    assert response.status_code == 507, response.content
    assert response.json()["code"] == "storage_full"
    assert all_files(isolated_data_dir / "artifacts") == [] and all_files(isolated_data_dir / "tmp") == []
    assert Artifact.objects.count() == 0


def test_multipart_upload_with_the_disk_full_is_507_and_leaves_nothing(api, isolated_data_dir):
    """Django writes the file part to a temporary file while parsing: that write may fail too."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    data = os.urandom(3 * LIMIT)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        response = api.post("/api/artifacts/", {"file": SimpleUploadedFile("big.bin", data)}, format="multipart")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert response.status_code == 507, response.content
    assert response.json()["code"] == "storage_full"
    assert all_files(isolated_data_dir / "artifacts") == [] and all_files(isolated_data_dir / "tmp") == []
    assert Artifact.objects.count() == 0
