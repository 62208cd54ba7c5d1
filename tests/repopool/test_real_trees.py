"""Commits on trees shaped like real projects: what ends up in the commit and the patch is exactly
what ``git status`` shows, and nothing kept or ignored is committed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from repopool import services as pool
from tests.conftest import run_git
from workcopy import git

pytestmark = pytest.mark.django_db

FILES = {
    "src/app.py": "def main():\n    return 1\n",
    "docs/windows.txt": "line one\r\nline two\r\n",
    "scripts/run.sh": "#!/bin/sh\necho run\n",
    "old name.txt": "to be renamed\n",
    "gone.txt": "to be deleted\n",
    ".gitignore": ".venv/\nbuild/\n*.pyc\n",
}


def _lease(make_repo, files=None, keep=(".venv",)):
    origin = make_repo(files or FILES)
    repo = pool.repository_create(name="real", url=str(origin), pool_size=1, keep_paths=list(keep))
    lease = pool.slot_allocate(repository=repo, holder="t")
    git.create_branch(lease.path, "agent/t")
    return repo, lease


def _status(path: Path) -> set[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], cwd=path, capture_output=True, check=True
    ).stdout.decode()
    return {entry[3:] for entry in out.split("\0") if entry and entry[:2] != "R "}


def _changed(path: Path, base: str) -> dict[str, str]:
    out = run_git(path, "-c", "core.quotePath=false", "diff", "--name-status", "--no-renames", base, "HEAD")
    return {line.split("\t", 1)[1]: line.split("\t", 1)[0] for line in out.splitlines()}


def _apply_patch_elsewhere(origin: Path, base: str, patch: Path, tmp_path: Path) -> Path:
    """A fresh clone at ``base`` with the patch applied by ``git am --keep-cr`` (plain ``git am``
    strips the CR of CRLF lines, as mail transport would); returns it."""
    clone = tmp_path / "applied"
    run_git(tmp_path, "clone", "-q", str(origin), str(clone))
    run_git(clone, "checkout", "-q", base)
    run_git(clone, "am", "-q", "--keep-cr", str(patch))
    return clone


def test_everything_git_status_shows_is_committed_and_nothing_kept_or_ignored(make_repo, tmp_path):
    repo, lease = _lease(make_repo)
    root = lease.path
    # The environment a setup command leaves (kept and ignored) and build output (ignored).
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "site.py").write_text("x = 1\n")
    (root / "build").mkdir()
    (root / "build" / "out.o").write_bytes(b"\x7fELF")
    (root / "src" / "app.pyc").write_bytes(b"\x00cache")
    # What an agent changes on a real project.
    (root / "src" / "app.py").write_text("def main():\n    return 2\n")
    (root / "docs" / "windows.txt").write_bytes(b"line one\r\nline 2\r\n")
    os.chmod(root / "scripts" / "run.sh", 0o755)
    (root / "old name.txt").rename(root / "new name ü.txt")
    (root / "gone.txt").unlink()
    (root / "données" / "été.md").parent.mkdir()
    (root / "données" / "été.md").write_text("# été\n")
    (root / "link-to-app").symlink_to("src/app.py")
    (root / "image.bin").write_bytes(bytes(range(256)) * 64)
    (root / "big.dat").write_bytes(os.urandom(3 * 1024 * 1024))
    expected = _status(root) - {".venv/lib/site.py"}
    assert ".venv/lib/site.py" not in expected and "build/out.o" not in expected  # the project ignores them

    assert git.has_changes(root, repo.keep_paths)
    commit = git.commit_all(root, "change", author_name="A", author_email="a@b", keep_paths=repo.keep_paths)
    changed = _changed(root, lease.commit)
    assert set(changed) == {
        "src/app.py", "docs/windows.txt", "scripts/run.sh", "old name.txt", "new name ü.txt", "gone.txt",
        "données/été.md", "link-to-app", "image.bin", "big.dat",
    }  # fmt: skip
    assert (changed["gone.txt"], changed["old name.txt"], changed["new name ü.txt"]) == ("D", "D", "A")
    assert _status(root) == set()  # nothing left over, nothing kept or ignored was touched
    assert (root / ".venv" / "lib" / "site.py").exists() and (root / "build" / "out.o").exists()
    # Exactly the bytes and modes on disk: CRLF kept, the executable bit, a symlink, binary content.
    assert run_git(root, "ls-files", "-s", "scripts/run.sh").startswith("100755")
    assert run_git(root, "ls-files", "-s", "link-to-app").startswith("120000")
    assert subprocess.run(["git", "show", "HEAD:docs/windows.txt"], cwd=root, capture_output=True).stdout == (
        b"line one\r\nline 2\r\n"
    )

    patch = tmp_path / "change.patch"
    git.format_patch(root, lease.commit, patch)
    applied = _apply_patch_elsewhere(Path(repo.url), lease.commit, patch, tmp_path)
    assert run_git(applied, "rev-parse", "HEAD^{tree}") == run_git(root, "rev-parse", f"{commit}^{{tree}}")


def test_kept_path_not_ignored_by_the_project_is_still_never_committed(make_repo):
    files = {**FILES, ".gitignore": "*.pyc\n"}  # the project does not ignore .venv or node_modules
    repo, lease = _lease(make_repo, files, keep=(".venv", "node_modules/"))
    (lease.path / ".venv").mkdir()
    (lease.path / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    (lease.path / "node_modules" / "x").mkdir(parents=True)
    (lease.path / "node_modules" / "x" / "index.js").write_text("1\n")
    assert not git.has_changes(lease.path, repo.keep_paths)  # the kept environment is no change
    (lease.path / "src" / "app.py").write_text("changed\n")
    git.commit_all(lease.path, "c", author_name="A", author_email="a@b", keep_paths=repo.keep_paths)
    assert set(_changed(lease.path, lease.commit)) == {"src/app.py"}


def test_repository_with_a_submodule_commits_without_touching_it(make_repo, tmp_path):
    library = make_repo({"lib.py": "VALUE = 1\n"}, name="library")
    origin = make_repo({"main.py": "print(1)\n"}, name="with-submodule")
    run_git(origin, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(library), "vendor/lib")
    run_git(origin, "commit", "-qm", "add submodule")
    repo = pool.repository_create(name="sub", url=str(origin), pool_size=1)
    lease = pool.slot_allocate(repository=repo, holder="t")
    git.create_branch(lease.path, "agent/t")
    (lease.path / "main.py").write_text("print(2)\n")
    git.commit_all(lease.path, "c", author_name="A", author_email="a@b", keep_paths=[])
    assert _changed(lease.path, lease.commit) == {"main.py": "M"}
    assert run_git(lease.path, "ls-tree", "HEAD", "vendor/lib").startswith("160000 commit")


def test_content_tree_names_the_content_and_leaves_the_index_alone(make_repo):
    repo, lease = _lease(make_repo)
    root = lease.path
    clean = git.content_tree(root, repo.keep_paths)
    assert clean == run_git(root, "rev-parse", "HEAD^{tree}")
    (root / ".venv").mkdir()
    (root / ".venv" / "x").write_text("kept\n")
    (root / "build").mkdir()
    (root / "build" / "y").write_text("ignored\n")
    assert git.content_tree(root, repo.keep_paths) == clean  # kept and ignored files are no content
    (root / "src" / "app.py").write_text("changed\n")
    changed = git.content_tree(root, repo.keep_paths)
    assert changed != clean
    assert run_git(root, "status", "--porcelain", "--untracked-files=no") == "M src/app.py"  # index untouched
    os.chmod(root / "scripts" / "run.sh", 0o755)
    assert git.content_tree(root, repo.keep_paths) != changed  # a mode is content too
    commit = git.commit_all(root, "c", author_name="A", author_email="a@b", keep_paths=repo.keep_paths)
    assert git.content_tree(root, repo.keep_paths) == run_git(root, "rev-parse", f"{commit}^{{tree}}")
