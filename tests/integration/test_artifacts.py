"""The artifact store over HTTP: text and binary round trips, a large artifact streamed both ways
with the client's memory bounded, several at once, and a checksum mismatch refused."""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

from tests.integration.deployment import expect

MIB = 1024 * 1024
LARGE_SIZE = int(os.environ.get("AGENTRUNNER_INTEGRATION_LARGE_MIB", "100")) * MIB


def upload(store, content: bytes, *, name: str, kind: str = "file", content_type: str = "application/octet-stream"):
    return store.post(
        "/api/artifacts/",
        params={"name": name, "kind": kind},
        content=content,
        headers={"Content-Type": content_type, "X-Content-SHA256": hashlib.sha256(content).hexdigest()},
    )


def download(store, artifact_id: str, **kwargs):
    return store.get(f"/api/artifacts/{artifact_id}/content/", **kwargs)


def test_text_round_trip_keeps_every_byte(store):
    text = "naïve café ✓\r\nline two\n\ttabbed\n".encode() * 50
    stored = expect(upload(store, text, name="notes.log", kind="log", content_type="text/plain"), 201)
    assert stored["sha256"] == hashlib.sha256(text).hexdigest() and stored["size"] == len(text)
    got = download(store, stored["id"])
    assert got.status_code == 200 and got.content == text
    assert got.headers["content-type"].startswith("text/plain")
    assert got.headers["x-content-sha256"] == stored["sha256"]


def test_binary_round_trip_ranges_and_etag(store):
    blob = bytes(range(256)) * 4096 + b"\x00\xff tail"
    stored = expect(upload(store, blob, name="data.bin"), 201)
    got = download(store, stored["id"])
    assert got.status_code == 200 and got.content == blob
    assert hashlib.sha256(got.content).hexdigest() == stored["sha256"]
    part = download(store, stored["id"], headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == blob[1000:2000]
    unchanged = download(store, stored["id"], headers={"If-None-Match": got.headers["etag"]})
    assert unchanged.status_code == 304 and unchanged.content == b""


def _chunks(seed: int, size: int, chunk: int = MIB):
    rng = random.Random(seed)
    left = size
    while left > 0:
        piece = rng.randbytes(min(chunk, left))
        left -= len(piece)
        yield piece


def test_large_artifact_streams_both_ways_in_bounded_client_memory(store, report):
    seed = int.from_bytes(os.urandom(4), "big")
    digest = hashlib.sha256()
    for piece in _chunks(seed, LARGE_SIZE):
        digest.update(piece)
    sha = digest.hexdigest()

    tracemalloc.start()
    try:
        stored = expect(
            store.post(
                "/api/artifacts/",
                params={"name": "large.bin", "kind": "file"},
                content=_chunks(seed, LARGE_SIZE),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(LARGE_SIZE),
                    "X-Content-SHA256": sha,
                },
                timeout=600,
            ),
            201,
        )
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        received = hashlib.sha256()
        size = 0
        with store.stream("GET", f"/api/artifacts/{stored['id']}/content/", timeout=600) as response:
            assert response.status_code == 200
            assert int(response.headers["content-length"]) == LARGE_SIZE
            for piece in response.iter_bytes():
                received.update(piece)
                size += len(piece)
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    report(
        f"large artifact {LARGE_SIZE // MIB} MiB: client peak {upload_peak / MIB:.1f} MiB up, "
        f"{download_peak / MIB:.1f} MiB down"
    )
    assert (stored["size"], stored["sha256"]) == (LARGE_SIZE, sha)
    assert (size, received.hexdigest()) == (LARGE_SIZE, sha)
    # Streaming holds a few chunks at a time; buffering would hold the whole artifact.
    assert upload_peak < 16 * MIB and download_peak < 16 * MIB


def test_several_artifacts_at_once_each_stored_and_listed(store, registry, make_task):
    task = make_task()
    blobs = {f"part-{n}.bin": os.urandom(256 * 1024 + n) for n in range(6)}

    def send(item):
        name, content = item
        return store.post(
            "/api/artifacts/",
            params={"name": name, "kind": "file", "task": task["id"]},
            content=content,
            headers={
                "Content-Type": "application/octet-stream",
                "X-Content-SHA256": hashlib.sha256(content).hexdigest(),
            },
        )

    with ThreadPoolExecutor(max_workers=6) as workers:
        stored = [expect(response, 201) for response in workers.map(send, blobs.items())]
    assert {s["name"] for s in stored} == set(blobs)
    for artifact in stored:
        assert download(store, artifact["id"]).content == blobs[artifact["name"]]
    linked = expect(registry.get(f"/api/tasks/{task['id']}/artifacts/"), 200)
    assert sorted(a["id"] for a in linked) == sorted(s["id"] for s in stored)


def test_checksum_mismatch_is_400_and_stores_nothing(store, registry, make_task):
    task = make_task()
    content = b"what was sent\n"
    refused = store.post(
        "/api/artifacts/",
        params={"name": "bad.txt", "kind": "log", "task": task["id"]},
        content=content,
        headers={"Content-Type": "text/plain", "X-Content-SHA256": hashlib.sha256(b"something else").hexdigest()},
    )
    body = expect(refused, 400)
    assert body["code"] and "sha256" in (body["detail"] + str(body.get("errors", ""))).lower()
    assert expect(registry.get(f"/api/tasks/{task['id']}/artifacts/"), 200) == []
