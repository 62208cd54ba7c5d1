"""Sandbox benchmark: what bubblewrap (and the per-command cgroup) adds to one command.

    python bench/sandbox.py [--rounds 15]

Runs `true` and a small pytest run (the sample project of the tests) three ways, in interleaved
rounds (A B C A B C ...) so a busy machine weighs on each the same:
  direct   a plain `sh -c` subprocess (what commands were before the sandbox),
  limits   run_command without bubblewrap (rlimits, cgroup, bounded output),
  bwrap    run_command under bubblewrap (the default).
Prints medians and spreads (p10-p90) in milliseconds. Target: bwrap - direct < 30 ms per command.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from _setup import ROOT, median, percentile, temp_dir

sys.path.insert(0, str(ROOT))

from common.procs import run_command, safe_env  # noqa: E402
from common.sandbox import SandboxConfig, probe_bwrap, sandbox_status  # noqa: E402

SAMPLE = {
    "calc.py": "def add(a, b):\n    return a + b\n",
    "test_calc.py": "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    data = temp_dir("bench-sandbox-")  # removed at exit, as every bench's folders
    slot = data / "pool" / "sample" / "0"
    slot.mkdir(parents=True)
    for name, content in SAMPLE.items():
        (slot / name).write_text(content)
    out = data / "tmp" / "out.log"
    out.parent.mkdir()
    sandboxed = SandboxConfig(configured="bwrap", data_dir=data)
    unsandboxed = SandboxConfig(configured="none", data_dir=data)
    works, reason = probe_bwrap(sandboxed.bwrap)
    if not works:
        sys.exit(f"bubblewrap does not work here: {reason}")
    print(f"sandbox: {sandbox_status(sandboxed)}")
    env = safe_env({"PYTHONDONTWRITEBYTECODE": "1"})

    def direct(command: str) -> None:
        with open(out, "wb") as fh:
            subprocess.run(command, shell=True, cwd=slot, stdout=fh, stderr=subprocess.STDOUT, env=env, check=True)

    def through(config: SandboxConfig):
        def go(command: str) -> None:
            result = run_command(command, cwd=slot, timeout=60, output_path=out, env=env, config=config)
            assert result.ok, result.tail

        return go

    ways = {"direct": direct, "limits": through(unsandboxed), "bwrap": through(sandboxed)}
    commands = {"true": "true", "pytest": f"{sys.executable} -m pytest -q -p no:cacheprovider"}
    print(f"{'command':8} {'way':7} {'median ms':>10} {'p10-p90 ms':>16} {'added ms':>9}")
    for label, command in commands.items():
        for way in ways.values():  # warm-up: caches, the bwrap probe
            way(command)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                started = time.perf_counter()
                way(command)
                times[name].append((time.perf_counter() - started) * 1000)
        base = median(times["direct"])
        for name, values in times.items():
            spread = f"{percentile(values, 0.1):.1f}-{percentile(values, 0.9):.1f}"
            print(f"{label:8} {name:7} {median(values):10.1f} {spread:>16} {median(values) - base:9.1f}")


if __name__ == "__main__":
    main()
