"""Repo pool benchmark: fresh clone vs the git floors vs pool allocate+release of a dirty slot.

    python bench/pool.py [--rounds 7] [--database postgres|sqlite]

The repository is real source: the installed Django package's own files (about 3,600), committed
into a local origin. Every round runs each operation once, in the same order (interleaved, so a
change of machine state hits them all alike); it prints the median and p25–p75 over rounds and the
ratios of the medians.

- headline: pool allocate + release with ref = the branch and a fetch every time
  (REPO_POOL_FETCH_TTL=0), the runner's real path;
- the same with ref = the slot's commit id (no fetch, no checkout: the cheapest case);
- floors on a plain clone dirtied the same way: `reset --hard + clean -ffdx`, and
  `fetch + reset --hard origin/main + clean -ffdx` (the same git work as the real path);
- a fresh `git clone --no-local`.

The dirtying (10 modified, 3 deleted, 10 new and 1 ignored file, in the agent's place) is not timed.
Targets: the real path >= 10x faster than a clone and within 2x of the fetch + reset floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from _setup import build_django_repo, django_in_tempdir, git, median, spread, temp_dir


def dirty(path: Path, round_no: int) -> None:
    """What an agent leaves: modified, deleted, new and ignored files."""
    tracked = sorted(p for p in (path / "django" / "db").rglob("*.py"))[:20]
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
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    args = parser.parse_args()

    django_in_tempdir("bench-pool-", database=args.database)
    from django.conf import settings

    from repopool import services

    work = temp_dir("bench-pool-src-")
    origin = work / "origin"
    origin.mkdir()
    n_files = build_django_repo(origin)
    floor_copy = work / "floor"
    git(work, "clone", "-q", str(origin), str(floor_copy))

    settings.REPO_POOL_FETCH_TTL = 0  # the real path pays its fetch every time
    repo = services.repository_create(name="bench", url=str(origin), pool_size=1)
    services.pool_warm(repository=repo)
    head = git(origin, "rev-parse", "HEAD")

    def pool_cycle(ref: str, fetch: bool, round_no: int) -> float:
        start = time.perf_counter()
        lease = services.slot_allocate(repository=repo, holder="bench", ref=ref, fetch=fetch)
        allocated = time.perf_counter()
        dirty(lease.path, round_no)  # not timed
        release_start = time.perf_counter()
        services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
        return (allocated - start) + (time.perf_counter() - release_start)

    def floor_reset() -> None:
        git(floor_copy, "reset", "-q", "--hard")
        git(floor_copy, "clean", "-ffdxq")

    def floor_fetch() -> None:
        git(floor_copy, "fetch", "-q", "origin")
        git(floor_copy, "reset", "-q", "--hard", "origin/main")
        git(floor_copy, "clean", "-ffdxq")

    results: dict[str, list[float]] = {k: [] for k in ("clone", "reset", "fetch", "branch", "sha")}
    pool_cycle("main", True, -1)  # warm-up, not counted
    for i in range(args.rounds):
        dest = work / f"clone{i}"
        results["clone"].append(timed(lambda d=dest: git(work, "clone", "-q", "--no-local", str(origin), str(d))))
        shutil.rmtree(dest)
        dirty(floor_copy, i)
        results["reset"].append(timed(floor_reset))
        dirty(floor_copy, i)
        results["fetch"].append(timed(floor_fetch))
        results["branch"].append(pool_cycle("main", True, i))
        results["sha"].append(pool_cycle(head, False, i))

    m = {k: median(v) for k, v in results.items()}
    labels = {
        "clone": "fresh git clone --no-local",
        "reset": "floor: reset --hard + clean -ffdx",
        "fetch": "floor: fetch + reset --hard origin/main + clean",
        "branch": "pool allocate+release, branch + fetch (headline)",
        "sha": "pool allocate+release, ref = commit id",
    }
    print(f"repository: Django's source, {n_files} files; {args.database}; {args.rounds} interleaved rounds")
    print(f"  {'':50s} {'median (p25–p75) ms':>26s}")
    for key, label in labels.items():
        print(f"  {label:50s} {spread(results[key], 1000):>26s}")
    print(f"  clone / pool (branch + fetch):        {m['clone'] / m['branch']:6.1f}x   (target >= 10x)")
    print(f"  pool (branch + fetch) / fetch floor:  {m['branch'] / m['fetch']:6.2f}x   (target <= 2x)")
    print(f"  pool (branch + fetch) / reset floor:  {m['branch'] / m['reset']:6.2f}x")
    print(f"  pool (commit id) / reset floor:       {m['sha'] / m['reset']:6.2f}x")


if __name__ == "__main__":
    main()
