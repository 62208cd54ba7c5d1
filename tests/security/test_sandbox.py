"""The sandbox around repository commands: each test runs a real hostile command through the real
seam (common.procs.run_command under bubblewrap) and asserts what the command could see or do,
from what it printed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command

from agentrunner.runner.pipeline import run_task
from common.procs import run_command, safe_env, strip_credentials
from common.sandbox import SandboxPolicy, SandboxUnavailable, sandbox_status
from registry import services as registry
from registry.models import TaskEvent
from repopool import services as pool
from tests.conftest import processes_running, run_git
from tests.runner.conftest import TEST_COMMAND, fixer
from tests.runner.helpers import ROOT, wait_for

PY = sys.executable
FAKE_SECRETS = {
    "OPENAI_API_KEY": "sk-fake-runner-key-0123456789",
    "DATABASE_URL": "postgres://runner:db-password-42@127.0.0.1:5432/agentrunner",
    "DJANGO_SECRET_KEY": "django-secret-key-of-the-runner-xyz",
    "ARTIFACTS_S3_SECRET_ACCESS_KEY": "s3-secret-access-key-abc",
}


@pytest.fixture(autouse=True)
def bwrap_required(settings):
    """CI installs bubblewrap (.ci/run): these tests run the real sandbox, never the fallback."""
    settings.AGENTRUNNER_SANDBOX = "bwrap"
    status = sandbox_status()
    assert status["mode"] == "bwrap", f"bubblewrap must work here: {status['reason']}"


def slot_dir(data: Path, name: str = "repo", index: int = 0) -> Path:
    """A slot where the pool puts one: inside the data folder."""
    path = data / "pool" / name / str(index)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(command: str, slot: Path, **kwargs) -> tuple[object, str]:
    out = Path(django_settings.TMP_ROOT) / f"out-{uuid.uuid4().hex[:6]}.log"
    timeout = kwargs.pop("timeout", 30)
    result = run_command(command, cwd=slot, timeout=timeout, output_path=out, **kwargs)
    return result, out.read_text(errors="replace")


# --- a runner process with real secrets in its environment ---------------------------------------
RUNNER_SCRIPT = """
import os, sys
import django
django.setup()
from pathlib import Path
from common.procs import run_command
result = run_command(sys.argv[2], cwd=Path(sys.argv[1]), timeout=60, output_path=Path(sys.argv[3]))
print(result.sandbox, result.exit_code)
"""


def runner_process(slot: Path, command: str, output: Path, **env_extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTRUNNER_")}
    env.update(
        DJANGO_SETTINGS_MODULE="agentrunner.settings",
        AGENTRUNNER_DATA_DIR=str(django_settings.DATA_DIR),
        AGENTRUNNER_SANDBOX="bwrap",
        PYTHONPATH=ROOT,
        **FAKE_SECRETS,
    )
    env.update(env_extra)
    return subprocess.Popen(
        [PY, "-c", RUNNER_SCRIPT, str(slot), command, str(output)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_command_finds_no_secret_of_the_runner_in_proc(isolated_data_dir):
    slot = slot_dir(isolated_data_dir)
    output = isolated_data_dir / "tmp" / "probe.log"
    probe = (
        "echo PPID=$PPID; cat /proc/$PPID/environ; cat /proc/*/environ; echo; env; "
        "echo PIDS $(ls /proc | grep -c '^[0-9]'); tr '\\0' ' ' < /proc/1/cmdline; echo"
    )
    child = runner_process(slot, probe, output)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr
    assert stdout.split() == ["bwrap", "0"]
    seen = output.read_text(errors="replace")
    assert "PPID=1\n" in seen  # the parent is the box's init, not the runner
    for name, secret in FAKE_SECRETS.items():
        assert secret not in seen, f"{name} leaked into the sandbox"
    assert "db-password-42" not in seen and "sk-fake" not in seen
    pids = int(seen.split("PIDS ")[1].split()[0])
    assert pids <= 6, seen  # bwrap's init, the shell and its pipeline; nothing of the host
    assert "RUNNER_SCRIPT" not in seen and "django.setup" not in seen


def test_command_cannot_reach_postgres_or_redis_on_the_host(isolated_data_dir):
    slot = slot_dir(isolated_data_dir)
    probe = (
        f'{PY} -c "import socket\nfor port in (5432, 6379):\n'
        "    s = socket.socket()\n    s.settimeout(2)\n"
        "    try:\n        s.connect(('127.0.0.1', port)); print(port, 'CONNECTED')\n"
        "    except OSError as exc:\n        print(port, 'refused', type(exc).__name__)\""
    )
    result, seen = run(probe, slot)
    assert result.sandbox == "bwrap"
    assert "5432 refused" in seen and "6379 refused" in seen, seen
    assert "CONNECTED" not in seen

    # A repository granted the network (setup commands by default) does reach the host.
    result, seen = run(probe, slot, policy=SandboxPolicy(writable=slot, network=True))
    assert "5432 CONNECTED" in seen, seen


def test_command_sees_neither_the_data_dir_nor_home(isolated_data_dir, tmp_path):
    data = isolated_data_dir
    slot = slot_dir(data, "mine")
    (slot / "own.txt").write_text("mine\n")
    other = slot_dir(data, "other", 1)
    (other / "secret.txt").write_text("OTHER-SLOT-SECRET\n")
    (data / "db.sqlite3").write_text("DATABASE-CONTENT\n")
    (data / "results" / "repo.git").mkdir(parents=True)
    (data / "results" / "repo.git" / "HEAD").write_text("RESULTS-CONTENT\n")
    (data / "artifacts" / "blob").write_text("ARTIFACT-CONTENT\n")
    fake_home = Path("/home") / f"ar-sandbox-test-{uuid.uuid4().hex[:8]}"
    (fake_home / ".ssh").mkdir(parents=True)
    try:
        (fake_home / ".ssh" / "id_ed25519").write_text("PRIVATE-KEY\n")
        probe = (
            f"cat own.txt; cat {data}/db.sqlite3 {other}/secret.txt {data}/results/repo.git/HEAD "
            f"{data}/artifacts/blob {fake_home}/.ssh/id_ed25519 $HOME/.ssh/id_rsa /root/.ssh/id_rsa; "
            f"echo HOME=$HOME; echo ROOT: $(ls -A /root); echo HOMES: $(ls -A /home); echo DATA: $(ls -A {data})"
        )
        result, seen = run(probe, slot)
    finally:
        shutil.rmtree(fake_home)
    assert "mine" in seen
    for content in ("OTHER-SLOT-SECRET", "DATABASE-CONTENT", "RESULTS-CONTENT", "ARTIFACT-CONTENT", "PRIVATE-KEY"):
        assert content not in seen, f"{content} visible in the sandbox"
    assert "HOME=/home/sandbox" in seen
    assert "HOMES: sandbox\n" in seen  # no other home folder, not even its name
    assert ".ssh" not in seen.split("ROOT:")[1].split("\n")[0]  # only toolchains of /root
    assert "DATA: pool\n" in seen  # only the path down to its own slot


def test_pool_and_results_configured_outside_the_data_dir_are_hidden(isolated_data_dir, settings):
    elsewhere = Path("/var/tmp") / f"ar-sandbox-test-{uuid.uuid4().hex[:8]}"  # not under /tmp
    try:
        settings.RESULTS_ROOT = elsewhere / "results"
        settings.REPO_POOL_ROOT = elsewhere / "pool"
        (elsewhere / "results").mkdir(parents=True)
        (elsewhere / "results" / "HEAD").write_text("RESULTS-CONTENT\n")
        other = elsewhere / "pool" / "other" / "0"
        other.mkdir(parents=True)
        (other / "secret.txt").write_text("OTHER-SLOT-SECRET\n")
        slot = elsewhere / "pool" / "mine" / "0"
        slot.mkdir(parents=True)
        _result, seen = run(f"cat {elsewhere}/results/HEAD {other}/secret.txt; ls -A {elsewhere}/pool", slot)
    finally:
        shutil.rmtree(elsewhere)
    assert "RESULTS-CONTENT" not in seen and "OTHER-SLOT-SECRET" not in seen, seen
    assert "other" not in seen.replace(f"{other}/secret.txt", "")


def test_command_has_no_capability_to_undo_the_mounts(isolated_data_dir):
    slot = slot_dir(isolated_data_dir)
    (isolated_data_dir / "db.sqlite3").write_text("DATABASE-CONTENT\n")
    data = isolated_data_dir
    probe = (
        "grep CapEff /proc/self/status; "
        f"umount {data} 2>&1; umount -l {data} 2>&1; mount -o remount,rw / 2>&1; "
        f"unshare -Urm sh -c 'umount -l {data}; cat {data}/db.sqlite3' 2>&1; cat {data}/db.sqlite3 2>&1; true"
    )
    _result, seen = run(probe, slot)
    assert "CapEff:\t0000000000000000" in seen, seen
    assert "DATABASE-CONTENT" not in seen, seen


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_sqlite_database_folder_is_hidden(isolated_data_dir, tmp_path, settings):
    project = tmp_path / "project"
    (project / "var").mkdir(parents=True)
    (project / "var" / "db.sqlite3").write_text("PROJECT-DATABASE\n")
    databases = {"default": {**settings.DATABASES["default"]}}
    databases["default"].update(ENGINE="django.db.backends.sqlite3", NAME=str(project / "var" / "db.sqlite3"))
    settings.DATABASES = databases
    slot = slot_dir(isolated_data_dir)
    _result, seen = run(f"cat {project}/var/db.sqlite3; ls -A {project}/var; echo done", slot)
    assert "PROJECT-DATABASE" not in seen and "db.sqlite3" not in seen.replace(f"{project}/var/db.sqlite3:", "")


def test_git_folder_is_read_only_and_the_slot_writable(repository, settings):
    lease = pool.slot_allocate(repository=repository, holder="hostile")
    slot = Path(lease.path)
    probe = (
        "printf '#!/bin/sh\\necho pwned\\n' > .git/hooks/pre-commit && echo HOOK-WRITTEN; "
        "echo '[core]' >> .git/config && echo CONFIG-WRITTEN; "
        "echo changed > calc.py && echo SLOT-WRITTEN; touch /usr/evil 2>&1 || echo ROOT-READONLY"
    )
    result, seen = run(probe, slot)
    assert "Read-only file system" in seen
    assert "HOOK-WRITTEN" not in seen and "CONFIG-WRITTEN" not in seen
    assert not (slot / ".git" / "hooks" / "pre-commit").exists()
    assert "SLOT-WRITTEN" in seen and (slot / "calc.py").read_text() == "changed\n"
    assert "ROOT-READONLY" in seen
    pool.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)


def test_background_processes_die_with_the_command(isolated_data_dir):
    slot = slot_dir(isolated_data_dir)
    # setsid: out of the command's process group, so only the sandbox (pid namespace) catches it.
    result, seen = run("setsid sleep 141 > /dev/null 2>&1 & (sleep 142 &) ; echo launched", slot)
    assert result.ok and "launched" in seen
    wait_for(lambda: not processes_running(["sleep", "141"]) and not processes_running(["sleep", "142"]), timeout=3)


def test_fork_bomb_is_contained_and_the_runner_carries_on(isolated_data_dir):
    assert sandbox_status()["limits"]["processes"] == "cgroup"  # this host has a writable pids cgroup
    slot = slot_dir(isolated_data_dir)
    bomb = "for i in $(seq 2000); do sleep 143 & done; echo ALL-FORKED; wait"
    started = time.monotonic()
    result, seen = run(bomb, slot, timeout=8, policy=SandboxPolicy(writable=slot, max_processes=40))
    assert "ALL-FORKED" not in seen
    assert "fork" in seen.lower(), seen[-500:]  # "Cannot fork" / "Resource temporarily unavailable"
    assert time.monotonic() - started < 15
    wait_for(lambda: not processes_running(["sleep", "143"]), timeout=3, message="the bomb's processes to be gone")
    again, seen = run("echo still-here", slot)
    assert again.ok and "still-here" in seen


def test_huge_file_fails_inside_and_output_stays_bounded(isolated_data_dir):
    slot = slot_dir(isolated_data_dir)
    write_10_gb = (
        f"{PY} -c \"\nchunk = bytes(1 << 20)\nf = open('big', 'wb')\n"
        "try:\n    [f.write(chunk) for _ in range(10 * 1024)]\n    f.flush()\n"
        "except OSError as exc:\n    print('write failed:', exc.strerror)\n\"; echo runner-fine"
    )
    result, seen = run(write_10_gb, slot, policy=SandboxPolicy(writable=slot, max_file_bytes=4 << 20))
    assert "write failed: File too large" in seen, seen
    assert (slot / "big").stat().st_size <= 4 << 20
    assert "runner-fine" in seen

    # Output: the first bytes and the tail are kept, the middle dropped, the file bounded.
    result, seen = run(
        "echo FIRST; head -c 3000000 /dev/zero | tr '\\0' x; echo; echo LAST",
        slot,
        policy=SandboxPolicy(writable=slot, output_bytes=200_000),
    )
    assert result.ok and result.output_dropped > 2_000_000
    assert seen.startswith("FIRST") and seen.rstrip().endswith("LAST")
    assert len(seen) < 200_000 + 70_000 and "bytes of output dropped" in seen


def test_credentials_in_allowed_variables_are_stripped(isolated_data_dir, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "https://deploy:hunter2-token@pypi.example.com/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "https://a.example/simple https://__token__:pypi-XYZ@b.example/simple")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-in-os-environ")
    slot = slot_dir(isolated_data_dir)
    result, seen = run('echo "I=$PIP_INDEX_URL"; echo "E=$PIP_EXTRA_INDEX_URL"; env', slot, env=safe_env())
    assert "I=https://pypi.example.com/simple" in seen
    assert "E=https://a.example/simple https://b.example/simple" in seen
    assert "hunter2" not in seen and "pypi-XYZ" not in seen and "sk-in-os-environ" not in seen
    assert strip_credentials("git+ssh://git@host/x ftp://h/y") == "git+ssh://host/x ftp://h/y"


def test_the_hosts_ca_certificates_reach_setup_commands(isolated_data_dir, monkeypatch):
    # Behind a proxy with its own CA, pip and npm in a setup command need the host's CA paths.
    monkeypatch.setenv("NODE_EXTRA_CA_CERTS", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    result, seen = run('echo "N=$NODE_EXTRA_CA_CERTS P=$PIP_CERT"', slot_dir(isolated_data_dir), env=safe_env())
    assert "N=/etc/ssl/certs/ca-certificates.crt P=/etc/ssl/certs/ca-certificates.crt" in seen


def test_killed_runner_leaves_no_process_and_no_write_behind(isolated_data_dir):
    slot = slot_dir(isolated_data_dir)
    output = isolated_data_dir / "tmp" / "orphan-run.log"
    child = runner_process(slot, "touch started.txt; sleep 3.5; echo x > orphan.txt", output)
    try:
        wait_for(lambda: processes_running(["sleep", "3.5"]), timeout=30, message="the command to start")
        assert (slot / "started.txt").exists()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
    wait_for(lambda: not processes_running(["sleep", "3.5"]), timeout=3, message="the sandbox to die with its runner")
    time.sleep(4)  # past the moment the command would have written
    assert not (slot / "orphan.txt").exists()


# --- without the sandbox: the backstop, the fallback, the refusal ---------------------------------
def test_reset_kills_what_an_unsandboxed_command_left_in_the_slot(repository, settings):
    lease = pool.slot_allocate(repository=repository, holder="dead runner")
    leftover = subprocess.Popen(
        ["sleep", "144"], cwd=lease.path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        pool.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
        assert leftover.wait(timeout=5) == -signal.SIGKILL
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_fallback_without_bubblewrap_runs_with_debug_and_refuses_without(isolated_data_dir, settings):
    slot = slot_dir(isolated_data_dir)
    settings.AGENTRUNNER_SANDBOX = "auto"
    settings.AGENTRUNNER_BWRAP = "/nonexistent/bwrap"
    settings.DEBUG = True
    status = sandbox_status()
    assert status["mode"] == "none" and status["configured"] == "auto"
    assert "/nonexistent/bwrap" in status["reason"]
    result, seen = run("echo ran; ls /proc | grep -c '^[0-9]'", slot)
    assert result.ok and result.sandbox == "none" and "ran" in seen

    settings.DEBUG = False
    assert sandbox_status()["mode"] == "unavailable"
    with pytest.raises(SandboxUnavailable) as refused:
        run("echo never > never.txt", slot)
    assert refused.value.code == "sandbox_unavailable" and "AGENTRUNNER_SANDBOX=none" in refused.value.message
    assert not (slot / "never.txt").exists()

    settings.AGENTRUNNER_SANDBOX = "bwrap"
    settings.DEBUG = True
    with pytest.raises(SandboxUnavailable, match="AGENTRUNNER_SANDBOX=bwrap"):
        run("echo never > never.txt", slot)

    settings.AGENTRUNNER_SANDBOX = "none"
    settings.DEBUG = False
    result, _ = run("echo chosen", slot)
    assert result.ok and result.sandbox == "none"


def test_health_reports_the_sandbox(staff_api, settings, db):
    """To staff: the mode, why and the limits (anyone else sees only ok / degraded / failing)."""
    body = staff_api.get("/api/health/").json()
    assert body["sandbox"]["mode"] == "bwrap" and body["sandbox"]["limits"]["processes"] == "cgroup"
    assert body["sandbox"]["status"] == "ok"

    settings.AGENTRUNNER_SANDBOX = "auto"
    settings.AGENTRUNNER_BWRAP = "/nonexistent/bwrap"
    settings.DEBUG = True  # a laptop: the fallback is allowed
    response = staff_api.get("/api/health/")
    assert response.status_code == 200 and response.json()["sandbox"]["mode"] == "none"

    settings.DEBUG = False
    response = staff_api.get("/api/health/")
    assert response.status_code == 503 and response.json()["sandbox"]["mode"] == "unavailable"


# --- through a whole task -------------------------------------------------------------------------
PROBE = """\
import glob, os, socket, sys
found = []
for path in glob.glob("/proc/*/environ"):
    try:
        if b"SECRET-OF-THE-RUNNER" in open(path, "rb").read():
            found.append(path)
    except OSError:
        pass
print("PROBE environ-secrets", found or "none")
s = socket.socket(); s.settimeout(2)
try:
    s.connect(("127.0.0.1", 5432)); print("PROBE postgres reachable")
except OSError:
    print("PROBE postgres refused")
print("PROBE data-dir", sorted(os.listdir(sys.argv[1])))
# Besides the slot, only this run's own report folder (for JUnit XML) is there, and nothing else
# of the runner's tmp/ (other runs, spooled uploads).
tmp = os.path.join(sys.argv[1], "tmp")
runs = os.listdir(tmp) if os.path.isdir(tmp) else []
print("PROBE tmp", len(runs), sorted(os.listdir(os.path.join(tmp, runs[0]))) if runs else [])
"""


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_task_runs_its_tests_in_the_sandbox(llm, make_repo, monkeypatch, settings):
    from tests.conftest import SAMPLE_PROJECT

    monkeypatch.setenv("OPENAI_API_KEY", "SECRET-OF-THE-RUNNER")
    origin = make_repo({**SAMPLE_PROJECT, "probe.py": PROBE})
    data = settings.DATA_DIR
    repo = pool.repository_create(
        name="probed", url=str(origin), pool_size=1, keep_paths=[".venv"],
        test_command=f"{TEST_COMMAND} && {PY} probe.py {data}",
    )  # fmt: skip
    assert repo.test_network is False
    llm.responder = fixer
    task = registry.task_create(title="fix add", instructions="make add add", repository=repo)
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded", summary.message
    assert "PROBE environ-secrets none" in summary.tests_tail
    assert "PROBE postgres refused" in summary.tests_tail
    assert "PROBE data-dir ['pool', 'tmp']" in summary.tests_tail
    assert "PROBE tmp 1 ['reports']" in summary.tests_tail
    assert not TaskEvent.objects.filter(task=task, type="sandbox").exists()  # sandboxed: nothing to say
    assert summary.sandbox == ""
    run_git(origin, "status")  # the origin is untouched by the box


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_task_without_the_sandbox_says_so(llm, sample_repo, settings):
    from agentrunner.runner.summary import format_summary

    settings.AGENTRUNNER_SANDBOX = "auto"
    settings.AGENTRUNNER_BWRAP = "/nonexistent/bwrap"
    settings.DEBUG = True  # a laptop (make demo): the fallback is allowed
    llm.responder = fixer
    task = registry.task_create(title="fix add", instructions="make add add", repository=sample_repo)
    summary = run_task(task_id=task.pk)
    assert summary.status == "succeeded", summary.message
    event = TaskEvent.objects.get(task=task, type="sandbox")
    assert event.message.startswith("commands ran WITHOUT a sandbox:") and "/nonexistent/bwrap" in event.message
    assert "sandbox   commands ran WITHOUT a sandbox" in format_summary(summary)

    settings.DEBUG = False  # production: refused before anything is claimed; the task stays queued
    task = registry.task_create(title="refused", instructions="x", repository=sample_repo, max_attempts=1)
    with pytest.raises(SandboxUnavailable, match="Refusing to run repository commands unsandboxed"):
        run_task(task_id=task.pk)
    task.refresh_from_db()
    assert task.status == "queued" and task.attempts.count() == 0
    with pytest.raises(CommandError, match="Refusing to run repository commands unsandboxed"):
        call_command("runagent", "--loop", "--until-idle", "--quiet")
    task.refresh_from_db()
    assert task.status == "queued"
