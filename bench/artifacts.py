"""Artifact store benchmark: 1 GiB up and down through the HTTP API under gunicorn.

    python bench/artifacts.py [--size-mb 1024]

Prints, in one run: a raw copy of the same file on the same disk (the floor), upload and download
throughput through the API, their ratio to the floor, and the gunicorn worker's peak memory growth.
Target: at least half the raw copy throughput; peak memory growth under 64 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from _setup import ROOT, django_in_tempdir

CHUNK = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    args = parser.parse_args()
    data = django_in_tempdir("bench-artifacts-")
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    token = Token.objects.create(user=get_user_model().objects.create_user(username="bench")).key
    source = data / "source.bin"
    with open(source, "wb") as fh:
        block = os.urandom(CHUNK)
        for _ in range(args.size_mb):
            fh.write(block)
    size = source.stat().st_size
    digest = hashlib.sha256()
    with open(source, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)

    os.sync()
    start = time.perf_counter()
    shutil.copyfile(source, data / "copy.bin")
    os.sync()
    raw = time.perf_counter() - start
    (data / "copy.bin").unlink()

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "agentrunner.wsgi",
            "-w",
            "1",
            "-b",
            f"127.0.0.1:{port}",
            "--timeout",
            "600",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
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

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        start = time.perf_counter()
        conn.putrequest("POST", "/api/artifacts/?name=big.bin&kind=file")
        conn.putheader("Authorization", f"Token {token}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.putheader("X-Content-SHA256", digest.hexdigest())
        conn.endheaders()
        with open(source, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                conn.send(chunk)
        response = conn.getresponse()
        body = response.read()
        os.sync()
        upload = time.perf_counter() - start
        assert response.status == 201, body
        artifact_id = json.loads(body)["id"]

        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("GET", f"/api/artifacts/{artifact_id}/content/", headers={"Authorization": f"Token {token}"})
        response = conn.getresponse()
        received = 0
        with open(data / "download.bin", "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
        os.sync()
        download = time.perf_counter() - start
        assert received == size
        peak = proc_status(worker, "VmHWM") - baseline
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    mb = size / CHUNK
    print(f"artifact size: {mb:.0f} MiB")
    print(f"{'raw copy on the same disk (floor)':36s} {mb / raw:8.0f} MiB/s")
    print(f"{'upload through the API':36s} {mb / upload:8.0f} MiB/s   ratio {raw / upload:5.2f} of floor")
    print(
        f"{'download through the API (to disk)':36s} {mb / download:8.0f} MiB/s   ratio {raw / download:5.2f} of floor"
    )
    print(f"gunicorn worker peak memory growth: {peak / CHUNK:.1f} MiB (target < 64)")
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
