"""The README's commands, as a newcomer types them: every program exists, and the first hour's
commands run verbatim in a fresh copy of the repository after `make demo`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.firsthour.helpers import ROOT, VENV_BIN, clean_env, free_port, get, wait_until_serving

README = ROOT / "README.md"
FENCED_SHELL = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)
# Run for real by the slow test below (with the README's port replaced by a free one); the other
# lines need an API key, a broker, another database or a repository of the reader's own, or run
# until stopped.
RUN_PREFIXES = ("TOKEN=", "H=", 'curl -H "Authorization: Token $TOKEN"', "curl localhost:8000/api/health/")
SERVE_LINE = ".venv/bin/gunicorn agentrunner.wsgi"


def readme_commands() -> list[str]:
    """Each command of the README's ```sh blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in FENCED_SHELL.findall(README.read_text()):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def programs(command: str) -> list[list[str]]:
    """The programs a command line runs: the line's own (after VAR=value words) and any $(...)."""
    found = [inner for inner in re.findall(r"\$\(([^)]*)\)", command)]
    outer = re.sub(r"\$\([^)]*\)", "value", command.split(" #", 1)[0])
    words = shlex.split(outer)
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    result = [shlex.split(inner) for inner in found]
    if words:
        result.append(words)
    return result


def test_every_readme_command_runs_a_program_that_exists():
    from django.core.management import get_commands

    make_targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    commands = readme_commands()
    assert any(c.startswith(SERVE_LINE) for c in commands)
    problems = []
    for command in commands:
        for words in programs(command):
            program = words[0]
            if program in ("export", "cd"):
                continue
            if program == "make":
                if words[1] not in make_targets:
                    problems.append(f"{command}: no make target {words[1]}")
            elif program.startswith(".venv/bin/"):
                if not (VENV_BIN / program.removeprefix(".venv/bin/")).exists():
                    problems.append(f"{command}: {program} is not in the virtualenv")
                if words[1:2] == ["manage.py"] and words[2] not in get_commands():
                    problems.append(f"{command}: no management command {words[2]}")
            elif "/" not in program and shutil.which(program) is None:
                problems.append(f"{command}: {program}: command not found (a bare name outside .venv/bin/)")
            elif program in ("gunicorn", "celery", "python", "pip", "ruff", "pytest"):
                problems.append(f"{command}: {program} lives in .venv/bin/ and the README never activates it")
    assert not problems, "\n".join(problems)


def fresh_clone(target: Path) -> Path:
    """The repository's files as a clone has them (what is committed or about to be), and the
    virtualenv `make` would have made."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if name == ".venv" or not source.is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(VENV_BIN.parent)
    return target


def stop_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def serve(command: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        ["bash", "-c", command], cwd=cwd, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    port = re.search(r"127\.0\.0\.1:(\d+)", command).group(1)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base + "/api/health/", process, timeout=90)
    except BaseException:
        stop_group(process)
        raise
    return process, base


@pytest.mark.slow
def test_the_first_hour_runs_verbatim_in_a_fresh_clone(tmp_path):
    clone = fresh_clone(tmp_path / "clone")
    env = clean_env(tmp_path)
    for name in ("AGENTRUNNER_DATA_DIR", "DATABASE_URL", "PYTHONPATH"):
        env.pop(name)  # the clone's own defaults: var/ and var/db.sqlite3
    # `-o .venv/.installed`: the virtualenv is the one running these tests, already installed
    # (the copied requirements files may look newer than it).
    make = ["make", "-s", "-o", ".venv/.installed"]
    demo = subprocess.run([*make, "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "status    succeeded" in demo.stdout and "make serve" in demo.stdout
    assert "recorded cost $" in demo.stdout and "spent $0" in demo.stdout

    port = free_port()
    commands = readme_commands()
    served = [c for c in commands if c.startswith(SERVE_LINE)]
    assert len(served) == 1
    process, base = serve("exec " + served[0].replace("0.0.0.0:8000", f"127.0.0.1:{port}"), clone, env)
    try:
        assert get(base + "/static/admin/css/base.css")[0] == 200
        assert get(base + "/api/docs/")[0] == 200 and get(base + "/api/redoc/")[0] == 200
        chosen = [c for c in commands if c.startswith(RUN_PREFIXES)]
        # The token (twice in the README), the header, a task list with the token, the health check.
        assert all(any(c.startswith(prefix) for c in chosen) for prefix in RUN_PREFIXES), chosen
        script = [c.replace("localhost:8000", f"127.0.0.1:{port}") for c in chosen]
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "\n".join(script)],
            cwd=clone, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert '"results":' in ran.stdout  # the task list answered alice's token (401 otherwise)
        assert '"status":"ok"' in ran.stdout
    finally:
        stop_group(process)

    helped = subprocess.run(
        [".venv/bin/python", "manage.py", "runagent", "--help"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--max-iterations" in helped.stdout

    process, base = serve(" ".join([*make, "serve", f"ADDR=127.0.0.1:{free_port()}"]), clone, env)
    try:
        assert get(base + "/static/admin/css/base.css")[0] == 200
        assert (clone / "var" / "static" / "admin" / "css" / "base.css").exists()  # collected
    finally:
        stop_group(process)
