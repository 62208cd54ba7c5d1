"""The agent's file tools against an attacker who controls the working copy.

Each test reproduces an attack found against the tools: writing through a hard link, swapping a
folder for a symlink between check and use, blocking on a FIFO, reading a huge sparse file into
memory, reaching ``.git`` under another letter case, and reading a committed symlink to a host
file through ``search_code``.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from agentrunner.agent.loop import repository_map
from agentrunner.agent.workspace import ToolError, Workspace
from tests.conftest import run_git

SECRET = "host secret 7d1f0c"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the working copy standing for the rest of the host."""
    folder = tmp_path / "host"
    folder.mkdir()
    (folder / "secret.txt").write_text(f"{SECRET}\n")
    return folder


@pytest.fixture
def ws(tmp_path) -> Workspace:
    root = tmp_path / "work"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("VALUE = 1\n")
    return Workspace(root)


def outcome(call) -> str:
    """The tool's answer, or its error as the model would read it (as the agent loop does)."""
    try:
        return call()
    except ToolError as exc:
        return f"error: {exc}"
    except OSError as exc:
        return f"error: {exc.strerror or exc}"


# --- hard links ---------------------------------------------------------------------------------
def test_a_hard_link_to_an_outside_file_is_replaced_not_written_through(ws, outside):
    target = outside / "secret.txt"
    os.link(target, ws.root / "linked.txt")
    os.link(target, ws.root / "pkg" / "linked.py")

    assert ws.write_file("linked.txt", "overwritten\n") == "overwrote linked.txt (12 characters)"
    assert ws.edit_file("pkg/linked.py", SECRET, "edited") == "edited pkg/linked.py"

    assert target.read_text() == f"{SECRET}\n"
    assert os.stat(target).st_nlink == 1  # both names in the working copy are now files of their own
    assert (ws.root / "linked.txt").read_text() == "overwritten\n"
    assert (ws.root / "pkg" / "linked.py").read_text() == "edited\n"


# --- races --------------------------------------------------------------------------------------
_LIBC = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _swap_folder(root: Path, outside: Path, stop: threading.Event, counter: list[int]) -> None:
    """`d` is a real folder; renameat2(RENAME_EXCHANGE) atomically trades it for a symlink to
    outside and back, so there is never a moment without a `d`."""
    os.symlink(outside, root / "d.link")
    folder, link = os.fsencode(root / "d"), os.fsencode(root / "d.link")
    while not stop.is_set():
        if _LIBC.renameat2(_AT_FDCWD, folder, _AT_FDCWD, link, _RENAME_EXCHANGE) != 0:
            raise OSError(ctypes.get_errno(), "renameat2 failed")
        counter[0] += 1


def test_a_folder_swapped_for_a_symlink_during_writes_never_escapes(ws, outside):
    (ws.root / "d").mkdir()
    stop, swaps = threading.Event(), [0]
    swapper = threading.Thread(target=_swap_folder, args=(ws.root, outside, stop, swaps), daemon=True)
    swapper.start()
    written = refused = 0
    deadline = time.monotonic() + 5
    try:
        for number in range(3000):
            if time.monotonic() > deadline:
                break
            try:
                ws.write_file(f"d/f{number % 50}.txt", "pwned\n")
                written += 1
            except (ToolError, OSError):
                refused += 1
    finally:
        stop.set()
        swapper.join(5)

    escaped = sorted(p.name for p in outside.iterdir() if p.name != "secret.txt")
    assert escaped == []
    assert (outside / "secret.txt").read_text() == f"{SECRET}\n"
    # The race was real: the folder was swapped many times and writes both landed and were refused.
    assert swaps[0] > 50 and written > 0 and refused > 0, (swaps[0], written, refused)


def test_a_folder_swapped_for_a_symlink_during_reads_never_shows_outside_content(ws, outside):
    (ws.root / "d").mkdir()
    (ws.root / "d" / "secret.txt").write_text("inside\n")
    stop, swaps = threading.Event(), [0]
    swapper = threading.Thread(target=_swap_folder, args=(ws.root, outside, stop, swaps), daemon=True)
    swapper.start()
    answers: list[str] = []
    deadline = time.monotonic() + 5
    try:
        for _ in range(3000):
            if time.monotonic() > deadline:
                break
            answers.append(outcome(lambda: ws.read_file("d/secret.txt")))
            answers.append(outcome(lambda: ws.search_code("secret|inside", "d")))
    finally:
        stop.set()
        swapper.join(5)

    assert not [answer for answer in answers if SECRET in answer]
    assert swaps[0] > 50 and "    1| inside" in answers and any(a.startswith("error:") for a in answers)


# --- special files ------------------------------------------------------------------------------
def _within(seconds: float, call, unblock) -> str:
    """Runs the call in a thread; fails (after unblocking it) if it does not answer in time."""
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(outcome(call)), daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        unblock()
        worker.join(5)
        pytest.fail(f"the tool blocked for more than {seconds}s")
    return result[0]


def test_a_fifo_is_an_error_at_once_never_a_hang(ws):
    fifo = ws.root / "pkg" / "pipe.txt"
    os.mkfifo(fifo)

    def unblock():  # a writer opening the FIFO releases a reader stuck in open() (and vice versa)
        for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
            try:
                os.close(os.open(fifo, flags))
            except OSError:
                pass

    assert "not a regular file (a FIFO)" in _within(5, lambda: ws.read_file("pkg/pipe.txt"), unblock)
    assert "not a regular file (a FIFO)" in _within(5, lambda: ws.edit_file("pkg/pipe.txt", "a", "b"), unblock)
    assert "not a regular file (a FIFO)" in _within(5, lambda: ws.write_file("pkg/pipe.txt", "x"), unblock)
    assert _within(5, lambda: ws.search_code("VALUE"), unblock) == "pkg/mod.py:1: VALUE = 1"
    assert "pkg/pipe.txt (not a regular file)" in _within(5, lambda: ws.list_files("."), unblock)
    assert fifo.is_fifo()


def test_a_socket_is_an_error(ws):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(ws.root / "pkg" / "agent.sock"))
        server.listen(1)
        for call in (
            lambda: ws.read_file("pkg/agent.sock"),
            lambda: ws.edit_file("pkg/agent.sock", "a", "b"),
            lambda: ws.write_file("pkg/agent.sock", "x"),
        ):
            with pytest.raises(ToolError, match="not a regular file"):
                call()
        assert ws.search_code("VALUE", "pkg") == "pkg/mod.py:1: VALUE = 1"
    finally:
        server.close()


def test_a_sparse_gib_file_is_never_read_whole(ws):
    gib = 1024**3
    with open(ws.root / "zeros.bin", "wb") as handle:
        handle.truncate(gib)
    with open(ws.root / "huge.log", "wb") as handle:  # text at the start, then a hole
        handle.write(b"line of text\n" * 1000)
        handle.truncate(gib)

    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(ToolError, match="binary file"):
            ws.read_file("zeros.bin")
        with pytest.raises(ToolError, match="too large for edit_file"):
            ws.edit_file("huge.log", "line", "x")
        shown = ws.read_file("huge.log", start_line=999, end_line=1000)
        assert ws.search_code("line of text") == "no matches"  # files over 1 MiB are skipped
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert shown.splitlines()[:2] == ["  999| line of text", " 1000| line of text"]
    assert f"the file is {gib} bytes; read_file reads only its first" in shown
    assert peak < 64 * 1024**2, f"peak {peak} bytes"
    assert elapsed < 5, f"took {elapsed:.1f}s"


# --- .git in any letter case --------------------------------------------------------------------
@pytest.mark.parametrize("path", [".GIT/config", ".Git/hooks/x", "pkg/.gIt/config", ".git/config", ".GIT"])
def test_git_metadata_is_off_limits_in_any_letter_case(ws, path):
    for folder in (".GIT", ".Git/hooks", "pkg/.gIt"):
        (ws.root / folder).mkdir(parents=True, exist_ok=True)
    for name in (".GIT/config", ".Git/hooks/x", "pkg/.gIt/config"):
        (ws.root / name).write_text("[core]\n\thooksPath = /tmp/evil\n")

    for call in (
        lambda: ws.read_file(path),
        lambda: ws.write_file(path, "pwned"),
        lambda: ws.edit_file(path, "core", "pwned"),
        lambda: ws.delete_file(path),
        lambda: ws.list_files(path),
        lambda: ws.search_code("hooksPath", path),
    ):
        with pytest.raises(ToolError, match=r"\.git folder is off limits"):
            call()
    assert (ws.root / ".GIT/config").read_text().startswith("[core]")
    assert (ws.root / ".Git/hooks/x").read_text().startswith("[core]")
    assert ws.list_files(".").splitlines() == ["pkg/mod.py"]
    assert ws.search_code("hooksPath") == "no matches"


def test_the_first_message_map_leaves_git_metadata_out_in_any_case(ws):
    (ws.root / ".GIT" / "hooks").mkdir(parents=True)
    (ws.root / ".GIT" / "hooks" / "pre-commit").write_text("#!/bin/sh\n")
    (ws.root / ".Git").write_text("gitdir: /elsewhere\n")
    assert repository_map(ws) == "Repository files (1):\npkg/mod.py"


def test_a_symlink_into_git_metadata_under_another_case_is_refused(ws):
    (ws.root / ".GIT").mkdir()
    (ws.root / ".GIT" / "config").write_text("[core]\n")
    os.symlink(".GIT", ws.root / "meta")
    os.symlink(str(ws.root / ".GIT" / "config"), ws.root / "cfg")
    for path in ("meta/config", "cfg"):
        with pytest.raises(ToolError, match=r"\.git folder is off limits"):
            ws.write_file(path, "pwned")
    assert (ws.root / ".GIT" / "config").read_text() == "[core]\n"


# --- symlinks to host files ---------------------------------------------------------------------
def test_a_committed_symlink_to_a_host_file_never_shows_its_content(tmp_path, outside):
    origin = tmp_path / "origin"
    origin.mkdir()
    run_git(origin, "init", "-q", "-b", "main")
    (origin / "README.md").write_text("notes are in notes.txt\n")
    os.symlink(outside / "secret.txt", origin / "notes.txt")
    (origin / "docs").mkdir()
    os.symlink(outside, origin / "docs" / "host")
    run_git(origin, "add", "-A")
    run_git(origin, "commit", "-q", "-m", "links")
    run_git(tmp_path, "clone", "-q", str(origin), "work")
    ws = Workspace(tmp_path / "work")
    assert (ws.root / "notes.txt").is_symlink()  # git checked the symlink out as it was committed

    with pytest.raises(ToolError, match="outside the repository"):
        ws.read_file("notes.txt")
    with pytest.raises(ToolError, match="outside the repository"):
        ws.read_file("docs/host/secret.txt")
    assert ws.search_code("host secret") == "no matches"
    assert ws.search_code("secret", "docs") == "no matches"
    with pytest.raises(ToolError, match="outside the repository"):
        ws.search_code("secret", "notes.txt")
    listing = ws.list_files(".")
    assert SECRET not in listing
    assert f"notes.txt -> {outside / 'secret.txt'} (symlink)" in listing.splitlines()
    with pytest.raises(ToolError, match="outside the repository"):
        ws.list_files("docs/host")
    # Deleting the link removes the link only.
    assert ws.delete_file("notes.txt") == "deleted notes.txt"
    assert (outside / "secret.txt").read_text() == f"{SECRET}\n"
