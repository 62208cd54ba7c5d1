"""Repo pool benchmark: fresh clone vs raw reset floor vs pool allocate+release of a dirty slot.

    python bench/pool.py [--files 4500] [--runs 7]

Builds a git repository from an installed package's source (about 4,500 files), then prints
medians side by side with the ratios. Target: allocate+release >= 10x faster than a fresh clone
and within 2x of the raw `git reset --hard && git clean -ffdx` floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _setup import django_in_tempdir, median

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "b",
    "GIT_AUTHOR_EMAIL": "b@example.com",
    "GIT_COMMITTER_NAME": "b",
    "GIT_COMMITTER_EMAIL": "b@example.com",
}


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True)


def build_repo(dest: Path, files: int) -> int:
    import botocore
    import django
    import rest_framework

    dest.mkdir(parents=True)
    count = 0
    for package in (django, rest_framework, botocore):
        source = Path(package.__file__).parent
        for path in sorted(source.rglob("*")):
            if count >= files:
                break
            if path.is_file() and "__pycache__" not in path.parts:
                target = dest / source.name / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                count += 1
    (dest / ".gitignore").write_text("*.pyc\nbuild/\n.venv/\n")
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "import")
    return count


def dirty(path: Path, round_no: int) -> None:
    """What an agent leaves: modified, deleted, new and ignored files, and a branch."""
    tracked = sorted(p for p in path.rglob("*.py") if ".git" not in p.parts)[:20]
    for p in tracked[:10]:
        p.write_text(p.read_text() + f"\n# edit {round_no}\n")
    for p in tracked[10:13]:
        p.unlink()
    (path / "new_module").mkdir(exist_ok=True)
    for i in range(10):
        (path / "new_module" / f"m{i}.py").write_text("x = 1\n" * 50)
    (path / "build").mkdir(exist_ok=True)
    (path / "build" / "out.bin").write_bytes(os.urandom(100_000))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=4500)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    django_in_tempdir("bench-pool-")
    from repopool import services

    work = Path(tempfile.mkdtemp(prefix="bench-pool-src-"))
    origin = work / "origin"
    n_files = build_repo(origin, args.files)

    clones = []
    for i in range(args.runs):
        dest = work / f"clone{i}"
        clones.append(timed(lambda d=dest: git(work, "clone", "-q", "--no-local", str(origin), str(d))))
        shutil.rmtree(dest)

    floor_copy = work / "floor"
    git(work, "clone", "-q", str(origin), str(floor_copy))
    floor = []
    for i in range(args.runs):
        dirty(floor_copy, i)
        floor.append(timed(lambda: (git(floor_copy, "reset", "-q", "--hard"), git(floor_copy, "clean", "-ffdxq"))))

    from django.conf import settings

    settings.REPO_POOL_FETCH_TTL = 0  # the branch variant pays its fetch every time
    repo = services.repository_create(name="bench", url=str(origin), pool_size=1)
    services.pool_warm(repository=repo)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=origin, capture_output=True, text=True).stdout.strip()
    cycles_sha, cycles_branch = [], []
    for i in range(args.runs):
        for ref, fetch, bucket in ((head, False, cycles_sha), ("main", True, cycles_branch)):
            start = time.perf_counter()
            lease = services.slot_allocate(repository=repo, holder="bench", ref=ref, fetch=fetch)
            allocated = time.perf_counter()
            dirty(lease.path, i)  # not timed
            release_start = time.perf_counter()
            services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
            bucket.append((allocated - start) + (time.perf_counter() - release_start))

    clone_m, floor_m = median(clones), median(floor)
    sha_m, branch_m = median(cycles_sha), median(cycles_branch)
    print(f"repository: {n_files} files; medians over {args.runs} runs")
    print(f"{'fresh git clone --no-local':44s} {clone_m * 1000:9.1f} ms")
    print(f"{'raw reset --hard + clean -ffdx (floor)':44s} {floor_m * 1000:9.1f} ms")
    print(f"{'pool allocate+release (ref = commit id)':44s} {sha_m * 1000:9.1f} ms")
    print(f"{'pool allocate+release (ref = branch, fetch)':44s} {branch_m * 1000:9.1f} ms")
    print(f"clone / pool cycle (commit id): {clone_m / sha_m:6.1f}x   (target >= 10x)")
    print(f"pool cycle / floor (commit id): {sha_m / floor_m:6.2f}x   (target <= 2x)")
    print(f"clone / pool cycle (branch):    {clone_m / branch_m:6.1f}x")
    print(f"pool cycle / floor (branch):    {branch_m / floor_m:6.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
