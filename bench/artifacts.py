"""Artifact store benchmark: 1 GiB up and down through the HTTP API under gunicorn, beside its floors.

    python bench/artifacts.py [--size-mb 1024] [--rounds 5]

The floors do the same work as the store, in one Python process on the same disk: for the upload,
read the file in 1 MiB chunks, sha256 them, write them to a temp file, fsync, rename; for the
download, read, write, fsync. Each round runs floor-up, upload, floor-down, download (interleaved,
the order of each pair swapped in odd rounds), each round on fresh content; it prints medians with
p25–p75 over rounds, the ratios of the medians, and the gunicorn worker's peak memory growth. PostgreSQL, DEBUG off.
Targets: at least half the floor's throughput; peak memory growth under 64 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _setup import ROOT, django_in_tempdir, free_port, median, spread

CHUNK = 1024 * 1024


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def floor_upload(source: Path, dest_dir: Path) -> str:
    """The store's work without the store: read, sha256, write a temp file, fsync, rename."""
    digest = hashlib.sha256()
    tmp = dest_dir / "floor.part"
    with open(source, "rb") as fh, open(tmp, "wb") as out:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    tmp.rename(dest_dir / digest.hexdigest())
    return digest.hexdigest()


def floor_download(source: Path, dest: Path) -> None:
    with open(source, "rb") as fh, open(dest, "wb") as out:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def fresh_content(source: Path, size_mb: int, round_no: int) -> str:
    """New bytes each round (a store may short-cut content it has); returns their sha256."""
    digest = hashlib.sha256()
    block = os.urandom(CHUNK)
    with open(source, "wb") as fh:
        for i in range(size_mb):
            chunk = block if i else os.urandom(CHUNK)
            fh.write(chunk)
            digest.update(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return digest.hexdigest()


def api_upload(port: int, token: str, source: Path, sha: str, name: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.putrequest("POST", f"/api/artifacts/?name={name}&kind=file")
    conn.putheader("Authorization", f"Token {token}")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(source.stat().st_size))
    conn.putheader("X-Content-SHA256", sha)
    conn.endheaders()
    with open(source, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            conn.send(chunk)
    response = conn.getresponse()
    body = response.read()
    assert response.status == 201, body
    return json.loads(body)["id"]


def api_download(port: int, token: str, artifact_id: str, dest: Path) -> int:
    """Download to disk and fsync, as the floor does; returns the byte count."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", f"/api/artifacts/{artifact_id}/content/", headers={"Authorization": f"Token {token}"})
    response = conn.getresponse()
    assert response.status == 200, response.status
    received = 0
    with open(dest, "wb") as out:
        while chunk := response.read(CHUNK):
            out.write(chunk)
            received += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return received


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = django_in_tempdir("bench-artifacts-")
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    token = Token.objects.create(user=get_user_model().objects.create_user(username="bench")).key
    source = data / "source.bin"
    floor_dir = data / "floor"
    floor_dir.mkdir()

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "agentrunner.wsgi", "-w", "1", "-b", f"127.0.0.1:{port}"]
        + ["--timeout", "600", "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )
    results: dict[str, list[float]] = {"floor_up": [], "upload": [], "floor_down": [], "download": []}
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/api/health/")
                conn.getresponse().read()
                break
            except OSError:
                time.sleep(0.1)
        worker = worker_pid(server.pid)
        baseline = proc_status(worker, "VmRSS")

        for round_no in range(args.rounds):
            sha = fresh_content(source, args.size_mb, round_no)
            size = source.stat().st_size

            def up_floor() -> None:
                results["floor_up"].append(timed(lambda: floor_upload(source, floor_dir)))
                for stale in floor_dir.iterdir():
                    stale.unlink()

            def up_api(sha: str = sha, name: str = f"big{round_no}.bin") -> str:
                start = time.perf_counter()
                artifact_id = api_upload(port, token, source, sha, name)
                results["upload"].append(time.perf_counter() - start)
                return artifact_id

            def down_floor() -> None:
                results["floor_down"].append(timed(lambda: floor_download(source, floor_dir / "copy.bin")))
                (floor_dir / "copy.bin").unlink()

            def down_api(artifact_id: str, size: int = size) -> None:
                results["download"].append(timed(lambda: api_download(port, token, artifact_id, data / "download.bin")))
                assert (data / "download.bin").stat().st_size == size
                (data / "download.bin").unlink()

            # A B in even rounds, B A in odd ones: neither side always follows the other's writes.
            if round_no % 2 == 0:
                up_floor()
                artifact_id = up_api()
                down_floor()
                down_api(artifact_id)
            else:
                artifact_id = up_api()
                up_floor()
                down_api(artifact_id)
                down_floor()
        peak = proc_status(worker, "VmHWM") - baseline
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    mb = args.size_mb
    rate = {k: [mb / t for t in v] for k, v in results.items()}
    m = {k: median(v) for k, v in rate.items()}
    print(f"artifact size: {mb} MiB; PostgreSQL, gunicorn -w 1, DEBUG off; {args.rounds} interleaved rounds")
    print(f"  {'':52s} {'median (p25–p75) MiB/s':>24s}")
    print(f"  {'floor up: read + sha256 + write + fsync + rename':52s} {spread(rate['floor_up'], fmt='{:.0f}'):>24s}")
    print(f"  {'upload through the API':52s} {spread(rate['upload'], fmt='{:.0f}'):>24s}", end="")
    print(f"   ratio {m['upload'] / m['floor_up']:.2f} of floor")
    print(f"  {'floor down: read + write + fsync':52s} {spread(rate['floor_down'], fmt='{:.0f}'):>24s}")
    print(f"  {'download through the API (to disk, fsync)':52s} {spread(rate['download'], fmt='{:.0f}'):>24s}", end="")
    print(f"   ratio {m['download'] / m['floor_down']:.2f} of floor")
    print(f"  gunicorn worker peak memory growth: {peak / CHUNK:.1f} MiB (target < 64)")


if __name__ == "__main__":
    main()
