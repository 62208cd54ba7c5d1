"""An attacker's review of the trust boundary: each test is one attack that worked against main,
run with real components (real bubblewrap, real git, real PostgreSQL, the real test client), and
asserts that it no longer does."""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import connection

from agentrunner.runner.pipeline import run_task
from common.procs import run_command
from common.sandbox import sandbox_status
from registry import services as registry
from tests.llm_server import completion, tool
from tests.runner.conftest import llm, sample_repo  # noqa: F401  (the runner's fixtures, reused)

PY = sys.executable


@pytest.fixture
def bwrap_required(settings):
    settings.AGENTRUNNER_SANDBOX = "bwrap"
    status = sandbox_status()
    assert status["mode"] == "bwrap", f"bubblewrap must work here: {status['reason']}"


def slot_dir(data: Path) -> Path:
    path = data / "pool" / "repo" / "0"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_in_box(command: str, slot: Path, **kwargs) -> str:
    out = Path(django_settings.TMP_ROOT) / f"out-{uuid.uuid4().hex[:6]}.log"
    run_command(command, cwd=slot, timeout=30, output_path=out, **kwargs)
    return out.read_text(errors="replace")


CONNECT = """
import socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        print("CONNECTED", path)
    except OSError as exc:
        print("refused", path, type(exc).__name__)
"""


# --- a hostile repository command --------------------------------------------------------------
@pytest.mark.django_db
def test_box_cannot_reach_host_unix_sockets(bwrap_required, isolated_data_dir):
    """The box has its own network namespace, but a Unix socket on the read-only root is a file:
    connect() works through a read-only bind. PostgreSQL's own socket (trust or peer auth for
    local connections is common) and any service socket under /run were reachable: a test
    command could read and rewrite the whole database."""
    targets = []
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW unix_socket_directories")
            dirs = [d.strip() for d in cursor.fetchone()[0].split(",") if d.strip()]
            cursor.execute("SHOW port")
            port = cursor.fetchone()[0]
        targets += [f"{d}/.s.PGSQL.{port}" for d in dirs if Path(f"{d}/.s.PGSQL.{port}").exists()]
    # A service socket of our own under /run, where daemons put theirs.
    ours = Path("/run") / f"agentrunner-attack-{uuid.uuid4().hex[:8]}.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(ours))
    server.listen(1)
    try:
        targets.append(str(ours))
        slot = slot_dir(isolated_data_dir)
        (slot / "connect.py").write_text(CONNECT)
        output = run_in_box(f"{PY} connect.py " + " ".join(targets), slot)
    finally:
        server.close()
        os.unlink(ours)
    assert all(f"refused {t}" in output for t in targets), output
    assert "CONNECTED" not in output, output


@pytest.mark.django_db
def test_box_cannot_write_kernel_settings(bwrap_required, isolated_data_dir):
    """With the runner running as root (CI, containers), uid 0 in the box is the host's root for
    /proc/sys, and bubblewrap left /proc/sys writable: a test command could set
    kernel.core_pattern to ``|/its/slot/program`` and have the kernel run it as root outside
    the box at the next crash. The write here rewrites a harmless knob with its current value."""
    slot = slot_dir(isolated_data_dir)
    knob = "/proc/sys/vm/stat_interval"
    output = run_in_box(f"cat {knob} > {knob} && echo KNOB-WRITTEN; echo done", slot)
    assert "done" in output
    assert "KNOB-WRITTEN" not in output, output


@pytest.mark.django_db
def test_setup_command_cannot_make_the_runner_read_a_huge_watched_file(bwrap_required, make_repo):
    """The setup hash is computed outside the box, from files the setup command just wrote: a
    sparse watched file (instant to make, within the file size limit) was read whole into the
    runner's memory (``read_bytes``). Hashing streams now, at a bounded chunk size."""
    import tracemalloc

    from repopool import services as pool

    origin = make_repo({"requirements.txt": "a\n", "test_x.py": "def test(): pass\n"})
    repo = pool.repository_create(
        name="sparse",
        url=str(origin),
        pool_size=1,
        setup_command="truncate -s 512M requirements.txt",
        setup_watch_files=["requirements.txt"],
    )
    tracemalloc.start()
    try:
        [slot] = pool.pool_warm(repository=repo)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (Path(slot.path) / "requirements.txt").stat().st_size == 512 * 1024**2  # the setup did run
    assert slot.state == "free", slot.last_error
    assert peak < 64 * 1024**2, f"the runner held {peak // 1024**2} MiB to hash a watched file"


@pytest.mark.django_db
def test_box_cannot_read_the_checkouts_old_data_dir(bwrap_required, isolated_data_dir):
    """The root is readable in the box, the project checkout with it. With the data dir moved
    (``AGENTRUNNER_DATA_DIR``), the default one, ``var/`` in the checkout, was not hidden: a
    laptop's old SQLite database there (users, API tokens in clear) could be read."""
    old_data = Path(django_settings.BASE_DIR) / "var"
    old_data.mkdir(exist_ok=True)
    probe = old_data / f"attack-probe-{uuid.uuid4().hex[:8]}.sqlite3"
    probe.write_text("token-of-a-laptop-user")
    try:
        slot = slot_dir(isolated_data_dir)
        output = run_in_box(f"cat {probe}; ls {old_data} | sed 's/^/LISTED /'", slot)
    finally:
        probe.unlink()
    assert "token-of-a-laptop-user" not in output
    assert f"LISTED {probe.name}" not in output


# --- a hostile model ---------------------------------------------------------------------------
HUGE = 1_000_000


@pytest.mark.django_db(transaction=True)  # the run's heartbeat thread writes on its own connection
def test_model_cannot_write_megabytes_into_every_event(llm, sample_repo):  # noqa: F811
    """Each tool call is an event carrying the model's ``path`` (in the message and the data) and
    each step an event naming the model the server answered with: a megabyte per step, times up to
    10,000 steps, filled the events table and every page and API response that lists events."""
    llm.add(
        tool("read_file", path="a/" * (HUGE // 2)),
        completion(None, ("list_files", {"path": "."}), model="m" * HUGE),
        tool("finish", summary="done"),
    )
    task = registry.task_create(repository=sample_repo, title="t", instructions="look around")
    run_task(task_id=task.pk)
    events = list(task.events.order_by("seq"))
    assert {e.type for e in events} >= {"tool_call", "llm_call"}
    for event in events:
        size = len(event.message) + len(json.dumps(event.data))
        assert size < 16 * 1024, f"event {event.seq} {event.type} is {size} characters"


LEAK_TEST = """
import pathlib, zlib

MARK = "ALICE-" + "SECRET"


def test_leak():
    found = 0
    for path in pathlib.Path(".git/objects").glob("??/*"):
        if MARK.encode() in zlib.decompress(path.read_bytes()):
            found += 1
    logs = pathlib.Path(".git/logs")
    reflog = "".join(p.read_text() for p in logs.rglob("*") if p.is_file()) if logs.exists() else ""
    assert False, f"LEAKED-OBJECTS {found} REFLOG {reflog!r}"
"""


@pytest.mark.django_db(transaction=True)  # the run's heartbeat thread writes on its own connection
def test_next_user_of_a_slot_cannot_read_the_previous_tasks_work(llm, make_repo):  # noqa: F811
    """Slots are shared between users. After a task, the reset removed its branch but kept its
    commit, its files' blobs and the HEAD reflog naming them in the slot's .git, which the box
    reads: the next user's model wrote a test that printed them into that user's own test report."""
    from django.contrib.auth import get_user_model

    from artifacts.services import artifact_open
    from repopool import services as pool
    from tests.runner.conftest import TEST_COMMAND

    users = get_user_model().objects
    alice, bob = users.create_user(username="alice2"), users.create_user(username="bob2")
    repo = pool.repository_create(name="shared", url=str(make_repo()), pool_size=1, test_command=TEST_COMMAND)
    llm.add(
        tool("write_file", path="notes.txt", content="ALICE-SECRET launch codes\n"),
        tool("finish", summary="noted"),
        tool("write_file", path="test_leak.py", content=LEAK_TEST),
        tool("finish", summary="looked"),
    )
    first = registry.task_create(repository=repo, title="a", instructions="x", owner=alice, max_iterations=1)
    run_task(task_id=first.pk)
    first.refresh_from_db()
    assert first.result_commit  # alice's work was committed in the slot
    second = registry.task_create(repository=repo, title="b", instructions="y", owner=bob, max_iterations=1)
    run_task(task_id=second.pk)
    link = second.artifact_links.get(role="test_report")
    with artifact_open(artifact=link.artifact) as handle:
        report = handle.read().decode()
    assert "LEAKED-OBJECTS" in report, report  # bob's test did run and report
    assert "LEAKED-OBJECTS 0 " in report, report
    assert first.result_commit[:12] not in report, report  # nor the reflog naming alice's commit


PLANT_TEST = """
import pathlib


def test_plant():
    pathlib.Path(".venv/lib").mkdir(parents=True, exist_ok=True)
    pathlib.Path(".venv/lib/planted.pth").write_text("import os; os.system('steal')")
"""


@pytest.mark.django_db(transaction=True)  # the run's heartbeat thread writes on its own connection
def test_task_cannot_plant_code_in_kept_paths_for_the_next_user(llm, make_repo):  # noqa: F811
    """A repository's keep_paths (its .venv) survive resets to serve the next task, maybe another
    user's. The model (write_file) and the tests it wrote (in the box, where the slot is writable)
    could put a .pth there that the next user's test run would execute."""
    from repopool import services as pool
    from repopool.models import Slot
    from tests.runner.conftest import TEST_COMMAND

    repo = pool.repository_create(
        name="kept",
        url=str(make_repo()),
        pool_size=1,
        test_command=TEST_COMMAND,
        setup_command="mkdir -p .venv && echo installed > .venv/ok",
        keep_paths=[".venv"],
    )
    pool.pool_warm(repository=repo)
    llm.add(
        tool("write_file", path=".venv/evil.pth", content="import os\n"),
        tool("write_file", path="test_plant.py", content=PLANT_TEST),
        tool("run_tests", args=[]),
        tool("finish", summary="planted"),
    )
    task = registry.task_create(repository=repo, title="a", instructions="x", max_iterations=1)
    run_task(task_id=task.pk)
    venv = Path(Slot.objects.get(repository=repo).path) / ".venv"
    assert (venv / "ok").read_text() == "installed\n"  # the kept folder itself is still there
    assert not (venv / "evil.pth").exists()
    assert not (venv / "lib" / "planted.pth").exists()
    refusal = llm.requests[1]["messages"][-1]["content"]
    assert "keep_paths" in refusal, refusal


# --- a hostile plain user ----------------------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize("name", ["q", "repository", "owner", "status", "reason"])
def test_inspector_filters_with_a_nul_are_not_a_500(client, user, name):
    """PostgreSQL refuses a NUL in a text parameter: ``/runs/?q=%00`` was an Internal Server Error
    (a traceback in the log for every probe). A filter holding one matches nothing, like any
    unknown value."""
    client.raise_request_exception = False
    client.force_login(user)
    response = client.get(f"/runs/?{name}=a%00b")
    assert response.status_code == 200
