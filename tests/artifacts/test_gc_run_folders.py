"""artifacts_gc also clears the runner's abandoned run folders and the store's stale temporary files."""

from __future__ import annotations

import os
import time
import uuid
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from registry.models import Attempt, AttemptOutcome
from registry.services import task_create

pytestmark = pytest.mark.django_db

LONG_AGO = time.time() - 7200


def age(path: Path) -> None:
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(item, (LONG_AGO, LONG_AGO), follow_symlinks=False)


def run_folder(data_dir: Path, task_id: uuid.UUID, attempt: int, *, old: bool = True) -> Path:
    folder = data_dir / "tmp" / f"run-{task_id.hex}-{attempt}"
    folder.mkdir()
    (folder / "run.log").write_text("[   0.001s] claimed\n")
    (folder / "transcript.jsonl").write_text("{}\n")
    if old:
        age(folder)
    return folder


def test_gc_removes_abandoned_run_folders_only(repository, isolated_data_dir, tmp_path):
    task = task_create(title="t", instructions="x", repository=repository)
    Attempt.objects.create(task=task, number=1, runner_id="killed", outcome=AttemptOutcome.LOST)
    Attempt.objects.create(task=task, number=2, runner_id="alive", outcome=AttemptOutcome.RUNNING)
    abandoned = run_folder(isolated_data_dir, task.pk, 1)
    running = run_folder(isolated_data_dir, task.pk, 2)  # old files, but its attempt still runs
    unknown_task = run_folder(isolated_data_dir, uuid.uuid4(), 1)  # the task was deleted
    young = run_folder(isolated_data_dir, task.pk, 3, old=False)
    still_written = run_folder(isolated_data_dir, task.pk, 4)
    (still_written / "run.log").write_text("a fresh line\n")  # the folder's own mtime is old
    unrelated = isolated_data_dir / "tmp" / "keep-me"
    unrelated.mkdir()
    age(unrelated)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("not ours")
    planted = isolated_data_dir / "tmp" / f"run-{uuid.uuid4().hex}-1"
    planted.symlink_to(outside)
    age(planted)

    out = StringIO()
    call_command("artifacts_gc", stdout=out)

    assert "2 abandoned run folder(s)" in out.getvalue(), out.getvalue()
    assert not abandoned.exists() and not unknown_task.exists()
    assert running.exists() and young.exists() and still_written.exists() and unrelated.exists()
    assert (outside / "precious").read_text() == "not ours"


def test_gc_removes_stale_temporary_files_of_the_store(isolated_data_dir):
    store_tmp = isolated_data_dir / "artifacts" / "tmp"
    store_tmp.mkdir()
    stale = store_tmp / "upload-abc.part"
    stale.write_bytes(b"half an upload")
    age(stale)
    in_flight = store_tmp / "upload-def.part"
    in_flight.write_bytes(b"being written")
    out = StringIO()
    call_command("artifacts_gc", stdout=out)
    assert "removed 1 temporary file(s)" in out.getvalue()
    assert not stale.exists() and in_flight.exists()


def test_gc_dry_run_removes_nothing(repository, isolated_data_dir):
    folder = run_folder(isolated_data_dir, uuid.uuid4(), 1)
    out = StringIO()
    call_command("artifacts_gc", "--dry-run", stdout=out)
    assert "would remove" in out.getvalue() and "1 abandoned run folder(s)" in out.getvalue()
    assert folder.exists()
