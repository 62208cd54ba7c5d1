"""The git operations on a leased working copy, each checked against what plain git shows: the
branch, the change check, the commit, the reset, the fetch and the clone's packing."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from common.outcomes import GitError
from tests.conftest import run_git, write_files
from workcopy import config, git, slots

IGNORE = "build/\n*.log\n.venv/\n"


@pytest.fixture(autouse=True)
def own_config(tmp_path):
    config.configure(config.Config(pool_root=tmp_path / "pool", tmp_root=tmp_path / "tmp", local_repo_roots=None))
    yield
    config.configure(None)


@pytest.fixture
def spec(make_repo):
    origin = make_repo({"calc.py": "def add(a, b):\n    return a - b\n", "pkg/mod.py": "x = 1\n", ".gitignore": IGNORE})
    return slots.RepoSpec(name="sample", url=str(origin), default_branch="main", keep_paths=[".venv"])


@pytest.fixture
def slot(spec):
    path = slots.slot_dir("sample", 0)
    made = slots.prepare(spec, slots.SlotSeen(path=path), "", fetch_ttl=0)
    return path, made.commit


def test_a_new_branch_points_at_head_and_leaves_the_files_alone(slot):
    path, base = slot
    (path / "calc.py").write_text("changed\n")
    git.create_branch(path, "agent/abc")
    assert run_git(path, "symbolic-ref", "HEAD") == "refs/heads/agent/abc"
    assert run_git(path, "rev-parse", "HEAD") == base
    assert (path / "calc.py").read_text() == "changed\n"
    assert run_git(path, "status", "--porcelain") == "M calc.py"


def test_has_changes_counts_what_git_status_shows_and_nothing_ignored_or_kept(slot):
    path, _ = slot
    assert not git.has_changes(path, [".venv"])
    write_files(path, {"build/out/a.o": "x", "pkg/debug.log": "x", ".venv/lib/site.py": "x"})
    assert not git.has_changes(path, [".venv"])  # a new folder holding only ignored files, a kept path
    write_files(path, {"new/deep/er/file.py": "x"})
    assert git.has_changes(path, [".venv"])
    (path / "new/deep/er/file.py").unlink()
    assert not git.has_changes(path, [".venv"])  # the file gone, nothing is left to show
    (path / "pkg/mod.py").unlink()
    assert git.has_changes(path, [".venv"])
    run_git(path, "checkout", "--", "pkg/mod.py")
    (path / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    assert git.has_changes(path, [".venv"])
    # Staged only (the files equal the index, the index differs from HEAD): status still counts it.
    run_git(path, "add", "calc.py")
    assert run_git(path, "diff", "--name-only") == ""
    assert git.has_changes(path, [".venv"])


def test_the_commit_is_what_git_commit_makes(slot):
    path, base = slot
    git.create_branch(path, "agent/abc")
    write_files(path, {"calc.py": "fixed\n", "new/file.py": "n\n", "build/x.o": "ignored", ".venv/k": "kept"})
    (path / "pkg/mod.py").unlink()
    message = "\n  Fix add()  \n\n\n\nThe model's summary\t\n\n# not a comment here\n\nAgent-Runner-Task: 1\n\n"
    commit = git.commit_all(
        path, message, author_name="Agent Runner", author_email="ar@example.com", keep_paths=[".venv"]
    )

    assert run_git(path, "rev-parse", "refs/heads/agent/abc") == commit == run_git(path, "rev-parse", "HEAD")
    assert run_git(path, "symbolic-ref", "HEAD") == "refs/heads/agent/abc"
    assert run_git(path, "rev-parse", f"{commit}^") == base
    assert run_git(path, "show", "-s", "--format=%an <%ae>|%cn <%ce>", commit) == (
        "Agent Runner <ar@example.com>|Agent Runner <ar@example.com>"
    )
    # The message as git commit -m stores it (its cleanup is git stripspace's).
    expected = subprocess.run(["git", "stripspace"], input=message, capture_output=True, text=True).stdout
    raw = subprocess.run(["git", "cat-file", "commit", commit], cwd=path, capture_output=True, text=True).stdout
    assert raw.split("\n\n", 1)[1] == expected
    assert set(git.changed_files(path, base)) == {"calc.py", "new/file.py", "pkg/mod.py"}
    assert run_git(path, "status", "--porcelain") == ""  # everything git status showed went in
    assert run_git(path, "ls-tree", "-r", "--name-only", commit).split() == [".gitignore", "calc.py", "new/file.py"]

    with pytest.raises(GitError, match="nothing to commit"):
        git.commit_all(path, "again", author_name="a", author_email="a@example.com", keep_paths=[".venv"])
    assert run_git(path, "rev-parse", "HEAD") == commit


def test_reset_restores_tracked_files_removes_untracked_and_ignored_and_the_tasks_objects(slot, spec):
    path, base = slot
    git.create_branch(path, "agent/abc")
    write_files(path, {"calc.py": "secret change\n", "new/file.py": "secret new\n"})
    commit = git.commit_all(path, "task", author_name="a", author_email="a@example.com", keep_paths=[".venv"])
    blob = run_git(path, "rev-parse", f"{commit}:new/file.py")
    # What the tests wrote after the commit: ignored, untracked, a tracked file changed and one removed.
    write_files(path, {"build/out.o": "o", "debug.log": "l", "pkg/new.py": "u", "calc.py": "again\n", ".venv/k": "k"})
    (path / "pkg/mod.py").unlink()
    run_git(path, "branch", "other")
    run_git(path, "fetch", "--quiet", spec.url, "main")  # FETCH_HEAD names what was fetched
    (path / ".git/COMMIT_EDITMSG").write_text("secret change\n")

    slots.reset(spec, path, base)

    assert run_git(path, "status", "--porcelain", "--ignored") == "!! .venv/"  # only the kept path is left
    assert (path / "calc.py").read_text() == "def add(a, b):\n    return a - b\n"
    assert (path / "pkg/mod.py").read_text() == "x = 1\n"
    assert not any((path / name).exists() for name in ("build", "debug.log", "pkg/new.py", "new"))
    assert run_git(path, "rev-parse", "HEAD") == base
    assert run_git(path, "for-each-ref", "refs/heads/") == ""
    assert run_git(path, "reflog", "show", "--all") == ""  # no reflog names the task's commit
    for gone in (commit, blob):  # the next task reads .git: nothing of this one is left in it
        assert subprocess.run(["git", "cat-file", "-e", gone], cwd=path).returncode != 0
    assert run_git(path, "count-objects").startswith("0 objects")
    assert not (path / ".git/FETCH_HEAD").exists() and not (path / ".git/COMMIT_EDITMSG").exists()


def test_a_clone_is_one_pack_with_a_bitmap(slot):
    path, _ = slot
    packs = list((path / ".git/objects/pack").iterdir())
    assert len([p for p in packs if p.suffix == ".pack"]) == 1
    assert any(p.suffix == ".bitmap" for p in packs)
    assert run_git(path, "count-objects").startswith("0 objects")  # nothing loose


def test_fetching_a_branch_is_one_fetch_and_keeps_its_tracking_ref(slot, spec, git_runs):
    path, base = slot
    origin = Path(spec.url)
    for n in range(3):
        write_files(origin, {"calc.py": f"version {n}\n"})
        run_git(origin, "commit", "-qam", f"v{n}")
        newest = run_git(origin, "rev-parse", "HEAD")
        before = len(git_runs())
        assert git.resolve_or_fetch(path, "main", url=spec.url, refresh=True) == newest
        ran = git_runs(before)
        assert [line for line in ran if " fetch " in f" {line}"] and len(ran) == 2, ran  # one fetch, one rev-parse
        assert run_git(path, "rev-parse", "refs/remotes/origin/main") == newest


def test_a_hostile_config_file_is_replaced_without_blocking_or_writing_through(slot, tmp_path):
    path, _ = slot
    config_file = path / ".git/config"
    trusted = git.trusted_config_path(path).read_bytes()
    # A hard link to a file outside, with the trusted bytes: replaced, the outside file untouched.
    outside = tmp_path / "outside"
    outside.write_bytes(trusted)
    config_file.unlink()
    os.link(outside, config_file)
    git.secure_slot(path)
    assert config_file.stat().st_nlink == 1 and config_file.read_bytes() == trusted
    with open(config_file, "ab") as handle:
        handle.write(b"[core]\n\tfsmonitor = /bin/false\n")
    assert outside.read_bytes() == trusted
    # A FIFO: opening it for reading would wait for a writer; secure_slot replaces it at once.
    config_file.unlink()
    os.mkfifo(config_file)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (git.secure_slot(path), done.set()), daemon=True)
    worker.start()
    assert done.wait(10)
    assert config_file.read_bytes() == trusted
    # A symbolic link: replaced by a file, its target untouched.
    config_file.unlink()
    config_file.symlink_to(outside)
    outside.write_bytes(b"[core]\n")
    git.secure_slot(path)
    assert not config_file.is_symlink() and config_file.read_bytes() == trusted
    assert outside.read_bytes() == b"[core]\n"


def test_no_name_of_a_tasks_files_is_left_in_the_index(slot, spec):
    """git's untracked cache would keep the names of untracked files in .git/index, and a reset
    leaves there the name of one the task deleted itself: the next task's box reads .git."""
    path, base = slot
    write_files(path, {"pkg/acme-contract-draft.txt": "x"})
    assert git.has_changes(path, [".venv"])
    (path / "pkg/acme-contract-draft.txt").unlink()
    slots.reset(spec, path, base)
    index = (path / ".git/index").read_bytes()
    assert b"acme-contract-draft" not in index and b"UNTR" not in index


@pytest.fixture
def with_submodule(make_repo):
    """A repository whose tree holds a submodule at vendor/lib (a gitlink: a slot never checks it
    out, so its folder is empty), and the repository the gitlink names."""
    inner = make_repo({"lib.py": "x = 1\n"}, name="inner")
    origin = make_repo({"calc.py": "def add(a, b):\n    return a - b\n", ".gitignore": IGNORE}, name="outer")
    run_git(origin, "update-index", "--add", "--cacheinfo", f"160000,{run_git(inner, 'rev-parse', 'HEAD')},vendor/lib")
    run_git(origin, "commit", "-qm", "a submodule")
    spec = slots.RepoSpec(name="withsub", url=str(origin), default_branch="main", keep_paths=[".venv"])
    path = slots.slot_dir("withsub", 0)
    made = slots.prepare(spec, slots.SlotSeen(path=path), "", fetch_ttl=0)
    return spec, path, made.commit, inner


def _populate_with_a_filter(folder: Path, inner: Path, witness: Path) -> None:
    """What a command in the box can do (only the slot's own .git is read-only there): make a
    submodule's folder a repository whose config names a clean filter for every file, with a file
    whose stat data its index does not know (a status there hashes it through the filter)."""
    shutil.copytree(inner / ".git", folder / ".git")
    (folder / "lib.py").write_text("x = 1\n")
    (folder / ".gitattributes").write_text("* filter=evil\n")
    run_git(folder, "config", "filter.evil.clean", f"sh -c 'touch {witness}; cat'")


def test_our_git_never_runs_what_a_submodule_folder_holds(with_submodule, tmp_path):
    _spec, path, _base, inner = with_submodule
    assert (path / "vendor/lib").is_dir() and not any((path / "vendor/lib").iterdir())
    witness = tmp_path / "ran-outside-the-box"
    _populate_with_a_filter(path / "vendor/lib", inner, witness)

    changed = git.has_changes(path, [".venv"])
    assert not witness.exists()
    assert not changed  # the submodule's commit did not move
    write_files(path, {"calc.py": "fixed\n"})
    assert git.has_changes(path, [".venv"])
    assert not witness.exists()
    tree = git.content_tree(path, [".venv"])
    assert not witness.exists()
    _populate_with_a_filter(path / "vendor/lib", inner, witness)  # again, after the test run
    git.create_branch(path, "agent/abc")
    commit = git.commit_all(path, "fix", author_name="a", author_email="a@example.com", keep_paths=[".venv"])
    assert not witness.exists()
    assert run_git(path, "rev-parse", f"{commit}^{{tree}}") == tree
    assert run_git(path, "ls-tree", commit, "vendor/lib").split()[:2] == ["160000", "commit"]


def test_a_reset_empties_the_submodule_folders_a_task_filled(with_submodule, tmp_path):
    """git clean never enters a submodule's folder: what a task's commands left there (its files,
    a .git) would be read by the next task, maybe another user's."""
    spec, path, base, inner = with_submodule
    _populate_with_a_filter(path / "vendor/lib", inner, tmp_path / "witness")
    write_files(path, {"vendor/lib/notes/secret.txt": "the previous task's\n"})

    slots.reset(spec, path, base)

    assert (path / "vendor/lib").is_dir() and not any((path / "vendor/lib").iterdir())
    assert run_git(path, "status", "--porcelain", "--ignored") == ""


def test_a_large_file_a_task_staged_leaves_nothing_in_git_after_the_reset(slot, spec):
    """git add puts a file larger than core.bigFileThreshold (512 MiB by default) into a pack of
    its own, which prune never removes: the next task's commands (they read .git) would find it.
    The threshold is made small here, in the slot's own config, to stand for such a file."""
    path, base = slot
    trusted = git.trusted_config_path(path)
    trusted.write_bytes(trusted.read_bytes() + b"[core]\n\tbigFileThreshold = 1k\n")
    packs = sorted(p.name for p in (path / ".git/objects/pack").iterdir())
    git.create_branch(path, "agent/abc")
    write_files(path, {"data/large.bin": "the task's own data\n" * 1000})
    tree = git.content_tree(path, [".venv"])
    commit = git.commit_all(path, "task", author_name="a", author_email="a@example.com", keep_paths=[".venv"])
    assert run_git(path, "rev-parse", f"{commit}^{{tree}}") == tree
    blob = run_git(path, "rev-parse", f"{commit}:data/large.bin")

    slots.reset(spec, path, base)

    assert subprocess.run(["git", "cat-file", "-e", blob], cwd=path).returncode != 0
    assert sorted(p.name for p in (path / ".git/objects/pack").iterdir()) == packs


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    """Run ``argv`` as uid/gid 65534 (a runner that is not root: folder permissions hold for it)."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
        cwd="/", capture_output=True, text=True, env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"},
    )  # fmt: skip


@pytest.fixture
def open_folder():
    """A folder of /tmp that another user may enter (pytest's own are root's only)."""
    folder = Path(tempfile.mkdtemp(prefix="ar-locked-"))
    folder.chmod(0o755)
    yield folder
    git.remove_tree(folder)


def test_folders_a_task_locked_are_unlocked_so_a_runner_that_is_not_root_can_clean_them(open_folder):
    """chmod 000 on an untracked folder, 555 on a folder holding an untracked file: git clean fails
    for a runner that is not root (root ignores the modes), and the slot would be lost for good."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")  # CI runs as root
    copy = open_folder / "copy"
    copy.mkdir()
    run_git(copy, "init", "-q", "-b", "main")
    write_files(copy, {"src/a.py": "a\n"})
    run_git(copy, "add", "-A")
    run_git(copy, "-c", "user.name=a", "-c", "user.email=a@example.com", "commit", "-q", "-m", "a")
    write_files(copy, {"locked/deep/secret.txt": "s", "src/made.txt": "m"})
    outside = open_folder / "outside"
    outside.mkdir(mode=0o500)
    (copy / "locked" / "link").symlink_to(outside)  # a link to a folder is never followed
    subprocess.run(["chown", "-R", "65534:65534", str(copy)], check=True)
    (copy / "locked").chmod(0)
    (copy / "src").chmod(0o555)
    safe = ("git", "-c", f"safe.directory={copy}", "-C", str(copy))
    failed = _as_nobody(*safe, "clean", "-ffdxq")
    # The failure the slot would otherwise die of.
    assert failed.returncode != 0 and "Permission denied" in failed.stderr and "cannot change" not in failed.stderr

    git.unlock_folders(copy, skip=(".git",))

    assert stat.S_IMODE(outside.stat().st_mode) == 0o500  # untouched behind the link
    cleaned = _as_nobody(*safe, "clean", "-ffdxq")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (copy / "locked").exists() and not (copy / "src/made.txt").exists()
    assert (copy / "src/a.py").read_text() == "a\n"


def test_without_submodules_no_git_process_looks_for_them(slot, spec, git_runs):
    """The submodule folders are looked for by ls-files only when the index may hold one: a
    repository without any pays no process for it at the commit, the tree check and the reset."""
    path, base = slot
    git.create_branch(path, "agent/abc")
    write_files(path, {"calc.py": "fixed\n"})
    before = len(git_runs())
    git.content_tree(path, [".venv"])
    git.commit_all(path, "task", author_name="a", author_email="a@example.com", keep_paths=[".venv"])
    slots.reset(spec, path, base)
    ran = git_runs(before)
    assert ran and not [line for line in ran if "ls-files" in line]


def test_a_submodule_is_found_when_the_index_holds_one(slot):
    path, base = slot
    commit = run_git(path, "rev-parse", "HEAD")
    run_git(path, "update-index", "--add", "--cacheinfo", f"160000,{commit},vendor/lib")
    assert git._may_hold_gitlinks(path / ".git" / "index")
    assert git._gitlinks(path) == ["vendor/lib"]
