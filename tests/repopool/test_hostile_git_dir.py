"""A slot's .git is written by hostile code (the model's files, setup and test commands). Whatever
it puts there, the git operations the pool and the runner perform must not run a program.

Each attack points git at ``evil.sh``, which appends its label to a log. The operations under test
must leave the log absent; a control at the end runs plain git on the same slot and shows each
attack is live (the log fills), so the test cannot pass because an attack was mistyped.
"""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from repopool import services
from repopool.models import Slot
from tests.conftest import GIT_ENV
from workcopy import git

pytestmark = pytest.mark.django_db


def plant(slot: Path, log: Path) -> Path:
    """Write what hostile code could write into the slot; return the program every attack runs."""
    evil = slot / "tools" / "evil.sh"
    evil.parent.mkdir(exist_ok=True)
    # As a filter it passes stdin through, as a textconv it prints the file: nothing else breaks.
    evil.write_text(f'#!/bin/sh\necho "$1" >> {log}\ncase "$1" in clean|smudge) cat ;; textconv) cat "$2" ;; esac\n')
    evil.chmod(0o755)
    hooks = slot / "tools" / "hooks"
    hooks.mkdir(exist_ok=True)
    for hook in ("pre-commit", "post-commit", "post-checkout", "reference-transaction", "pre-push", "pre-auto-gc"):
        (hooks / hook).write_text(f"#!/bin/sh\necho hook-{hook} >> {log}\n")
        (hooks / hook).chmod(0o755)
        gitdir_hook = slot / ".git" / "hooks" / hook
        gitdir_hook.parent.mkdir(exist_ok=True)
        gitdir_hook.write_text(f"#!/bin/sh\necho gitdir-hook-{hook} >> {log}\n")
        gitdir_hook.chmod(0o755)
    (slot / "tools" / "included.config").write_text(f'[core]\n\tfsmonitor = "{evil} include-fsmonitor"\n')
    (slot / ".gitattributes").write_text("* filter=evil diff=evil merge=evil\n")
    (slot / ".git" / "info").mkdir(exist_ok=True)
    (slot / ".git" / "info" / "attributes").write_text("* filter=evil diff=evil\n")
    with open(slot / ".git" / "config", "a") as config:
        config.write(
            f"""
[core]
\tfsmonitor = {evil}
\thooksPath = {hooks}
\tsshCommand = {evil} ssh
\tgitProxy = {evil}
\tpager = {evil} pager
[include]
\tpath = ../tools/included.config
[filter "evil"]
\tclean = {evil} clean
\tsmudge = {evil} smudge
\trequired = false
[diff "evil"]
\tcommand = {evil} diff-driver
\ttextconv = {evil} textconv
[diff]
\texternal = {evil}
[credential]
\thelper = !{evil} credential
[protocol "ext"]
\tallow = always
[protocol]
\tallow = always
[remote "origin"]
\turl = ext::sh -c {evil}% ext
\tuploadpack = {evil} uploadpack
\treceivepack = {evil} receivepack
[uploadpack]
\tpackObjectsHook = {evil}
[alias]
\tstatus = !{evil} alias
"""
        )
    return evil


def run_runner_operations(slot: Path, lease, repository, settings) -> None:
    """What the runner does to a leased slot after the agent ran: branch, commit, push, patch."""
    git.create_branch(slot, "agent/hostile")
    (slot / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    assert git.has_changes(slot, [".venv"])
    commit = git.commit_all(
        slot, "fix add", author_name="Agent Runner", author_email="ar@example.com", keep_paths=[".venv"]
    )
    assert len(commit) == 40
    assert "calc.py" in git.changed_files(slot, lease.commit)
    bare = Path(settings.RESULTS_ROOT) / f"{repository.name}.git"
    git.ensure_bare(bare)
    git.push(slot, str(bare), "agent/hostile")
    assert (
        subprocess.run(
            ["git", "--git-dir", str(bare), "rev-parse", "refs/heads/agent/hostile"], capture_output=True, text=True
        ).stdout.strip()
        == commit
    )
    patch = slot.parent / "hostile.patch"
    git.format_patch(slot, lease.commit, patch)
    assert "+    return a + b" in patch.read_text()
    patch.unlink()


def test_nothing_in_a_slots_git_dir_runs_during_runner_and_pool_operations(repository, tmp_path, settings):
    settings.REPO_POOL_FETCH_TTL = 0  # every allocation fetches from origin
    log = tmp_path / "evil.log"
    lease = services.slot_allocate(repository=repository, holder="attack")
    slot = lease.path
    plant(slot, log)

    run_runner_operations(slot, lease, repository, settings)
    # Release resets the slot (checkout, clean, ref deletion), then allocation fetches from origin.
    services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
    assert Slot.objects.get(pk=lease.slot_id).state == "free"
    assert not log.exists(), log.read_text()

    # Plant again in the freed slot (a process left behind could), then allocate: fetch + checkout.
    plant(slot, log)
    again = services.slot_allocate(repository=repository, holder="attack-2")
    assert again.slot_id == lease.slot_id or Slot.objects.get(pk=lease.slot_id).state == "free"
    assert not log.exists(), log.read_text()
    assert Slot.objects.get(pk=again.slot_id).fetched_at is not None
    services.slot_release(slot_id=again.slot_id, lease_token=again.lease_token)
    assert not log.exists(), log.read_text()

    # Control: plain git (no hardening, the user's own config ignored) on the same planted slot
    # runs the attacks, so the assertions above were not vacuous.
    plant(slot, log)
    env = {**os.environ, **GIT_ENV, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0"}
    (slot / "calc.py").write_text("changed = True\n")
    for args in (["status", "--porcelain"], ["add", "-A"], ["commit", "-qm", "x"], ["diff", "HEAD~1"]):
        subprocess.run(["git", *args], cwd=slot, env=env, capture_output=True, timeout=60)
    subprocess.run(
        ["git", "fetch", "origin"], cwd=slot, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
    )
    fired = set(log.read_text().split())
    assert {"clean", "hook-post-commit", "include-fsmonitor"} <= fired, fired  # filter, hooksPath, include
    assert fired & {"diff-driver", "textconv"}, fired  # a diff driver named by .gitattributes
    assert fired & {"ext", "uploadpack"}, fired  # the origin URL turned into ext::


def test_git_dir_redirections_are_undone_or_refused(repository, tmp_path):
    log = tmp_path / "evil.log"
    evil = tmp_path / "evil.sh"
    evil.write_text(f"#!/bin/sh\necho redirected >> {log}\ncat\n")
    evil.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    subprocess.run(["git", "init", "-q", str(elsewhere)], check=True, env={**os.environ, **GIT_ENV})
    with open(elsewhere / ".git" / "config", "a") as config:
        config.write(f'[core]\n\tfsmonitor = {evil}\n[filter "evil"]\n\tclean = {evil}\n')

    lease = services.slot_allocate(repository=repository, holder="attack")
    slot = lease.path
    gitdir = slot / ".git"
    # commondir makes git read another repository's config; alternates borrow its objects.
    (gitdir / "commondir").write_text(str(elsewhere / ".git") + "\n")
    (gitdir / "config.worktree").write_text(f"[core]\n\tfsmonitor = {evil}\n")
    (gitdir / "objects" / "info" / "alternates").write_text(str(elsewhere / ".git" / "objects") + "\n")
    (slot / ".gitattributes").write_text("* filter=evil\n")
    (slot / "calc.py").write_text("x = 1\n")
    assert git.has_changes(slot, [])
    git.commit_all(slot, "m", author_name="a", author_email="a@example.com", keep_paths=[])
    assert not (gitdir / "commondir").exists() and not (gitdir / "objects" / "info" / "alternates").exists()
    assert not log.exists()
    services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
    assert Slot.objects.get(pk=lease.slot_id).state == "free"

    # .git replaced by a gitdir file (or a symlink) pointing elsewhere: refused, the slot breaks
    # (and is re-cloned by the next warm) instead of git working on the other repository.
    lease = services.slot_allocate(repository=repository, holder="attack-2")
    slot = lease.path
    os.rename(slot / ".git", tmp_path / "moved-gitdir")
    (slot / ".git").write_text(f"gitdir: {elsewhere / '.git'}\n")
    with pytest.raises(git.GitError, match="not a directory"):
        git.has_changes(slot, [])
    services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
    assert Slot.objects.get(pk=lease.slot_id).state == "broken"
    (slot / ".git").unlink()
    (slot / ".git").symlink_to(elsewhere / ".git")
    with pytest.raises(git.GitError, match="not a directory"):
        git.reset_clean(slot, lease.commit, [])
    assert not log.exists()
    [*_] = services.pool_warm(repository=repository)
    assert Slot.objects.get(pk=lease.slot_id).state == "free"
    assert (slot / ".git").is_dir() and not (slot / ".git").is_symlink()


def test_a_hostile_ref_name_never_reaches_git_as_an_option(repository, tmp_path):
    marker = tmp_path / "pwned"
    for ref in (f"--upload-pack=touch {marker}", "-h", "main\n--exec=x", "a b"):
        with pytest.raises(git.RefNotFound, match="not a valid branch, tag or commit name"):
            services.slot_allocate(repository=repository, holder="h", ref=ref)
    assert not marker.exists()
    assert Slot.objects.filter(state="leased").count() == 0


def test_fetch_uses_the_repositorys_url_not_the_slots_origin(repository, make_repo, tmp_path, settings):
    """A slot whose origin was pointed elsewhere still fetches from the registered repository."""
    settings.REPO_POOL_FETCH_TTL = 0
    lease = services.slot_allocate(repository=repository, holder="h")
    decoy = make_repo({"calc.py": "decoy = True\n"}, name="decoy")
    subprocess.run(
        ["git", "config", "--file", str(lease.path / ".git" / "config"), "remote.origin.url", str(decoy)], check=True
    )
    services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
    origin = Path(repository.url)
    (origin / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    subprocess.run(["git", "commit", "-qam", "fix"], cwd=origin, env={**os.environ, **GIT_ENV}, check=True)
    Slot.objects.filter(pk=lease.slot_id).update(fetched_at=timezone.now() - timedelta(hours=1))
    again = services.slot_allocate(repository=repository, holder="h2")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=origin, capture_output=True, text=True).stdout.strip()
    assert again.commit == head
    assert "return a + b" in (again.path / "calc.py").read_text()
