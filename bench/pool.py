"""Repo pool benchmark: fresh clone vs the git floors vs pool allocate+release of a dirty slot.

    python bench/pool.py [--rounds 7] [--database postgres|sqlite] [--only git|slots]
                         [--slot-rounds 3] [--slot-seconds 3] [--hold-ms 20]

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

Then, on PostgreSQL (``--only slots`` runs just these), slots under load: 16 forked processes, each
with its own connection, ``--slot-rounds`` rounds of ``--slot-seconds``, the compared cases
interleaved (the order reversed every other round):

a. allocate + release with no git work to do: ``slot_lease`` + ``slot_release_remote``, the
   bookkeeping the runner API performs for a remote host, called in-process, over 16 slots. Once
   with the line (now), once with the former polling (``repopool.waiting.MODE = "poll"``), and the
   floor: pgbench, 16 clients each on a thread of its own (as many schedulable threads as the 16
   processes: with -j 2 a busy machine starves pgbench), running the very claim statement
   ``slot_lease`` sends and the release's UPDATE (one round trip each; cycles counted in the
   table). Target >= 300 cycles/s.
b. contention: the same cycle over 4 slots, each allocator holding its slot ``--hold-ms`` (sleep),
   line vs polling. A fair queue makes everyone wait (16 - 4) / 4 = 3 holds; printed: the waits in
   units of the mean hold, and each allocator's share of the cycles against a fair share (target:
   all within 20 %).
c. the server host's path with git: ``slot_allocate`` (default branch, fetched every time) + a file
   written + ``slot_release`` over 16 slots of a 20-file repository, beside the same git work
   (fetch + reset --hard origin/main + clean -ffdx) on 16 plain clones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

from _setup import (
    build_django_repo,
    django_in_tempdir,
    git,
    in_processes,
    median,
    percentile,
    pgbench_path,
    small_repo,
    spread,
    temp_dir,
)


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


def git_section(args, work: Path) -> None:
    """One allocator on Django's source: the git work of a cycle beside its git floors."""
    from django.conf import settings

    from repopool import services

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


# --- slots under load: the bookkeeping and its line (PostgreSQL) ---------------------------------
ALLOCATORS = 16


def _cycle_worker(barrier, seconds: float, repository_id: int, host: str, capacity: int, mode: str, hold: float, out):
    """The runner API's bookkeeping for a remote host, in-process: ``slot_lease`` (waiting up to
    30 s) + ``hold`` seconds + ``slot_release_remote``, until ``seconds`` pass. Puts (waits, holds)."""
    from repopool import bookkeeping, waiting
    from repopool.models import Repository

    waiting.MODE = mode
    repository = Repository.objects.get(pk=repository_id)
    waits, holds = [], []
    barrier.wait()
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        asked = time.perf_counter()
        slot = bookkeeping.slot_lease(
            repository=repository, host=host, holder="bench", lease_seconds=600, wait_seconds=30, capacity=capacity
        )
        got = time.perf_counter()
        if hold:
            time.sleep(hold)
        bookkeeping.slot_release_remote(slot_id=slot.pk, token=slot.lease_token, commit=slot.commit)
        waits.append(got - asked)
        holds.append(time.perf_counter() - got)
    out.put((waits, holds))


def _server_path_worker(barrier, seconds: float, repository_id: int, out):
    """The server host's own path: ``slot_allocate`` (default branch, fetched) + a file written +
    ``slot_release`` (reset + clean). Puts the cycle times."""
    from repopool.models import Repository
    from repopool.services import slot_allocate, slot_release

    repository = Repository.objects.get(pk=repository_id)
    barrier.wait()
    stop = time.perf_counter() + seconds
    cycles = []
    while time.perf_counter() < stop:
        start = time.perf_counter()
        lease = slot_allocate(repository=repository, holder="bench", wait_seconds=60)
        (lease.path / "scratch.txt").write_text("agent output\n")
        slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
        cycles.append(time.perf_counter() - start)
    out.put(cycles)


def _git_floor_worker(barrier, seconds: float, path: str, out):
    """The same git work on a clone of one's own: fetch + reset --hard origin/main + clean -ffdx."""
    barrier.wait()
    stop = time.perf_counter() + seconds
    cycles = []
    while time.perf_counter() < stop:
        start = time.perf_counter()
        (Path(path) / "scratch.txt").write_text("agent output\n")
        git(Path(path), "fetch", "-q", "origin")
        git(Path(path), "reset", "-q", "--hard", "origin/main")
        git(Path(path), "clean", "-ffdxq")
        cycles.append(time.perf_counter() - start)
    out.put(cycles)


def _make_rows(repository, host: str, capacity: int) -> None:
    """The host's pool rows exist and are free before a run (a first lease would create them)."""
    from repopool import bookkeeping

    held = [
        bookkeeping.slot_lease(repository=repository, host=host, holder="setup", lease_seconds=600, capacity=capacity)
        for _ in range(capacity)
    ]
    for slot in held:
        bookkeeping.slot_release_remote(slot_id=slot.pk, token=slot.lease_token, commit="")


def _leases_of(host: str) -> int:
    from django.db.models import Sum

    from repopool.models import Slot

    return Slot.objects.filter(host=host).aggregate(n=Sum("lease_count"))["n"] or 0


def _floor_script(repository, host: str) -> str:
    """pgbench's cycle: the very claim statement ``slot_lease`` sends (turnstile + claim, one CTE),
    then the release's UPDATE, each one round trip."""
    from repopool import bookkeeping, waiting

    literal = {
        "turnstile": str(waiting.turnstile_key(repository.pk, host)), "repository": str(repository.pk),
        "host": f"'{host}'", "token": "gen_random_uuid()", "holder": "'pgbench'", "now": "now()",
        "expires": "now() + interval '600 seconds'", "lease_seconds": "600",
    }  # fmt: skip
    tail = "SELECT (SELECT open FROM gate), false AS left_line, leased.* FROM"
    assert tail in bookkeeping._CLAIM_AS_NEWCOMER_SQL
    claim = (bookkeeping._CLAIM_AS_NEWCOMER_SQL % literal).replace(
        tail, "SELECT coalesce(leased.id, 0) AS id, coalesce(leased.lease_token::text, '') AS token FROM"
    )
    release = (
        "UPDATE repopool_slot SET state = 'free', lease_token = NULL, lease_holder = '', lease_expires_at = NULL, "
        "needs_reset = false, state_changed_at = now() "
        "WHERE id = :id AND state = 'leased' AND lease_token::text = ':token'"
    )
    return " ".join(claim.split()) + " \\gset\n" + release + ";\n"


def _pgbench(script: Path, clients: int, seconds: float) -> None:
    import os

    binary = pgbench_path()
    if binary is None:
        raise SystemExit("pgbench not found (apt-get install postgresql-client): it is the floor of this bench")
    done = subprocess.run(
        [binary, "-n", "-f", str(script), "-c", str(clients), "-j", str(clients), "-T", str(max(1, round(seconds))),
         os.environ["DATABASE_URL"]],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"pgbench: {done.stderr.strip()[-2000:]}")


def slot_sections(args, work: Path) -> None:
    from django.conf import settings
    from django.db import connections

    from repopool import services

    rounds, seconds, hold = args.slot_rounds, args.slot_seconds, args.hold_ms / 1000
    small = small_repo(work / "small-origin")
    repo = services.repository_create(name="slots", url=str(small), pool_size=ALLOCATORS)

    # a. allocate + release with no git work: 16 allocators over 16 slots of a remote host.
    for host in ("bench-a-fifo", "bench-a-poll", "bench-a-floor"):
        _make_rows(repo, host, ALLOCATORS)
    script = work / "cycle.sql"
    script.write_text(_floor_script(repo, "bench-a-floor"))
    rates: dict[str, list[float]] = {"fifo": [], "poll": [], "floor": []}
    waits_a: dict[str, list[float]] = {"fifo": [], "poll": []}
    for r in range(rounds):
        for mode in ("fifo", "poll", "floor") if r % 2 == 0 else ("floor", "poll", "fifo"):
            if mode == "floor":
                connections.close_all()
                before = _leases_of("bench-a-floor")
                started = time.perf_counter()
                _pgbench(script, ALLOCATORS, seconds)
                elapsed = time.perf_counter() - started
                rates["floor"].append((_leases_of("bench-a-floor") - before) / elapsed)
                continue
            elapsed, results = in_processes(
                _cycle_worker, ALLOCATORS, seconds, repo.pk, f"bench-a-{mode}", ALLOCATORS, mode, 0.0
            )
            rates[mode].append(sum(len(w) for w, _ in results) / elapsed)
            waits_a[mode] += [x for w, _ in results for x in w]
    print("slots, a: allocate + release with no git work to do (slot_lease + slot_release_remote, the runner")
    print(f"  API's bookkeeping for a remote host, called in-process), {ALLOCATORS} processes over {ALLOCATORS} slots, "
          f"{rounds} interleaved rounds of {seconds:g} s, cycles/s:")  # fmt: skip
    floor = median(rates["floor"])
    for mode, label in (("fifo", "line + NOTIFY (now)"), ("poll", "polling (before)")):
        print(
            f"  {label:28s} {spread(rates[mode], fmt='{:.0f}'):>18s}   wait p50 {percentile(waits_a[mode], 0.5) * 1000:.1f} ms"
            f" p99 {percentile(waits_a[mode], 0.99) * 1000:.1f} ms   {median(rates[mode]) / floor:.2f} of the floor"
        )
    print(f"  {'floor: pgbench, same SQL':28s} {spread(rates['floor'], fmt='{:.0f}'):>18s}   (the claim CTE + the "
          f"release UPDATE, {ALLOCATORS} clients, a thread each)")  # fmt: skip
    got = median(rates["fifo"])
    print(f"  target >= 300 cycles/s: {got:.0f} ({'met' if got >= 300 else 'missed'})")

    # b. contention: 16 allocators over 4 slots, each holding a fixed time.
    slots_b = 4
    for mode in ("fifo", "poll"):
        _make_rows(repo, f"bench-b-{mode}", slots_b)
    stats: dict[str, dict[str, list]] = {
        m: {"rate": [], "waits": [], "holds": [], "lo": [], "hi": []} for m in ("fifo", "poll")
    }
    for r in range(rounds):
        for mode in ("fifo", "poll") if r % 2 == 0 else ("poll", "fifo"):
            elapsed, results = in_processes(
                _cycle_worker, ALLOCATORS, seconds, repo.pk, f"bench-b-{mode}", slots_b, mode, hold
            )
            counts = [len(w) for w, _ in results]
            fair = sum(counts) / ALLOCATORS
            st = stats[mode]
            st["rate"].append(sum(counts) / elapsed)
            st["waits"] += [x for w, _ in results for x in w]
            st["holds"] += [x for _, h in results for x in h]
            st["lo"].append(min(counts) / fair)
            st["hi"].append(max(counts) / fair)
    ideal = ALLOCATORS / slots_b - 1
    print(f"slots, b: contention, {ALLOCATORS} allocators over {slots_b} slots, each holding {args.hold_ms:g} ms "
          f"(sleep) then releasing, {rounds} interleaved rounds of {seconds:g} s; hold = from the grant to the "
          f"release's return, waits in units of the mean hold:")  # fmt: skip
    verdict = {}
    for mode, label in (("fifo", "line + NOTIFY (now)"), ("poll", "polling (before)")):
        st = stats[mode]
        h = sum(st["holds"]) / len(st["holds"])
        w = st["waits"]
        p99 = percentile(w, 0.99)
        verdict[mode] = (p99 / h, min(st["lo"]), max(st["hi"]))
        print(
            f"  {label:20s} {spread(st['rate'], fmt='{:.0f}'):>14s} cycles/s   hold {h * 1000:.1f} ms   wait mean "
            f"{sum(w) / len(w) / h:.1f}, p50 {percentile(w, 0.5) / h:.1f}, p99 {p99 / h:.1f} holds ({p99 * 1000:.0f} ms)"
            f"   shares of fair, worst round {min(st['lo']):.2f}–{max(st['hi']):.2f}"
        )
    p99_holds, lo, hi = verdict["fifo"]
    print(
        f"  a fair queue: every wait {ideal:g} holds ({ALLOCATORS} - {slots_b} ahead, {slots_b} served at a time), "
        f"every share 1.00. The issue's 'p99 <= 2 x mean hold' is below that ideal, impossible for any order;"
    )
    print(
        f"  read as p99 <= fair + 2 holds = {ideal + 2:g} holds: {p99_holds:.1f} "
        f"({'met' if p99_holds <= ideal + 2 else 'missed'}); every allocator within 20 % of its share: "
        f"{lo:.2f}–{hi:.2f} ({'met' if lo >= 0.8 and hi <= 1.2 else 'missed'})"
    )

    # c. the server host's path with git, beside the same git work on plain clones.
    settings.REPO_POOL_FETCH_TTL = 0  # the runner's real path: a fetch every time
    services.pool_warm(repository=repo)
    clones = []
    for i in range(ALLOCATORS):
        path = work / f"small-floor{i}"
        git(work, "clone", "-q", str(small), str(path))
        clones.append(str(path))
    pool_rates, pool_lat, git_rates, git_lat = [], [], [], []
    for r in range(rounds):
        for which in ("pool", "git") if r % 2 == 0 else ("git", "pool"):
            if which == "pool":
                elapsed, results = in_processes(_server_path_worker, ALLOCATORS, seconds, repo.pk)
                pool_rates.append(sum(map(len, results)) / elapsed)
                pool_lat += [x for cycles in results for x in cycles]
            else:
                elapsed, results = in_processes(_git_floor_worker, ALLOCATORS, seconds, each=[(c,) for c in clones])
                git_rates.append(sum(map(len, results)) / elapsed)
                git_lat += [x for cycles in results for x in cycles]
    print(f"slots, c: the server host's path, slot_allocate (default branch, fetched) + a file + slot_release, "
          f"{ALLOCATORS} processes over {ALLOCATORS} slots of a 20-file repository, {rounds} interleaved rounds:")  # fmt: skip
    print(f"  pool      {spread(pool_rates)} cycles/s   p50 {percentile(pool_lat, 0.5) * 1000:.0f} ms"
          f"   p99 {percentile(pool_lat, 0.99) * 1000:.0f} ms")  # fmt: skip
    print(f"  git floor {spread(git_rates)} cycles/s   p50 {percentile(git_lat, 0.5) * 1000:.0f} ms"
          f"   p99 {percentile(git_lat, 0.99) * 1000:.0f} ms   (fetch + reset --hard origin/main + clean -ffdx, a clone each)")  # fmt: skip
    print(f"  ratio {median(pool_rates) / median(git_rates):.2f} of the floor's throughput")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the single-allocator git part")
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--slot-rounds", type=int, default=3)
    parser.add_argument("--slot-seconds", type=float, default=3.0)
    parser.add_argument("--hold-ms", type=float, default=20.0, help="hold time in the contention part")
    parser.add_argument("--only", choices=["git", "slots"], help="run one part")
    args = parser.parse_args()

    django_in_tempdir("bench-pool-", database=args.database)
    work = temp_dir("bench-pool-src-")
    if args.only != "slots":
        git_section(args, work)
    if args.only != "git":
        if args.database == "postgres":
            slot_sections(args, work)
        else:
            print("slots under load: PostgreSQL only (SQLite serves one process: no line, no NOTIFY)")


if __name__ == "__main__":
    main()
