from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
import tracemalloc
from pathlib import Path
from urllib.parse import urlparse

import pytest
from django.test import Client

from artifacts import services
from artifacts.models import Artifact
from registry.services import task_create

pytestmark = pytest.mark.django_db


def blob_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "artifacts").rglob("*") if p.is_file()]


def tmp_files(data_dir: Path) -> list[Path]:
    """Temporary files: Django's multipart spool (data/tmp) and the store's own (artifacts/tmp)."""
    folders = [data_dir / "tmp", data_dir / "artifacts" / "tmp"]
    return [p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_file()]


def raw_upload(api, content: bytes, **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return api.generic(
        "POST", f"/api/artifacts/?{query}", content, content_type=params.pop("ctype", "application/octet-stream")
    )


def test_text_round_trip_multipart(api, isolated_data_dir):
    from django.core.files.uploadedfile import SimpleUploadedFile

    text = "line one\nline two ünïcödé\n".encode()
    response = api.post(
        "/api/artifacts/",
        {
            "file": SimpleUploadedFile("run.log", text, content_type="text/plain"),
            "kind": "log",
            "metadata": '{"attempt": 1}',
        },
        format="multipart",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["size"] == len(text) and body["sha256"] == hashlib.sha256(text).hexdigest()
    assert body["name"] == "run.log" and body["kind"] == "log"
    assert Artifact.objects.get(pk=body["id"]).metadata == {"attempt": 1}
    content = api.get(f"/api/artifacts/{body['id']}/content/")
    assert content.status_code == 200
    assert b"".join(content.streaming_content) == text
    assert content["ETag"] == f'"{body["sha256"]}"'
    assert content["Content-Type"].startswith("text/plain")
    assert tmp_files(isolated_data_dir) == []


def test_binary_round_trip_every_byte_value_raw_body(api):
    data = bytes(range(256)) * 1000
    response = api.generic("POST", "/api/artifacts/?name=blob.bin&kind=file", data, content_type="application/x-thing")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["content_type"] == "application/x-thing"
    content = api.get(f"/api/artifacts/{body['id']}/content/")
    assert b"".join(content.streaming_content) == data
    assert content["Content-Disposition"].startswith("attachment")


def test_identical_content_stored_once(api, isolated_data_dir):
    data = os.urandom(50_000)
    first = api.generic("POST", "/api/artifacts/?name=a.bin", data, content_type="application/octet-stream").json()
    second = api.generic("POST", "/api/artifacts/?name=b.bin", data, content_type="application/octet-stream").json()
    assert first["id"] != second["id"] and first["sha256"] == second["sha256"]
    assert len(blob_files(isolated_data_dir)) == 1


def test_checksum_mismatch_is_refused_and_nothing_stored(api, isolated_data_dir):
    data = b"hello"
    wrong = hashlib.sha256(b"other").hexdigest()
    response = api.generic(
        "POST", "/api/artifacts/?name=x", data, content_type="text/plain", HTTP_X_CONTENT_SHA256=wrong
    )
    assert response.status_code == 400 and response.json()["code"] == "checksum_mismatch"
    assert "sha256" in response.json()["errors"]
    right = api.generic(
        "POST",
        "/api/artifacts/?name=x",
        data,
        content_type="text/plain",
        HTTP_X_CONTENT_SHA256=hashlib.sha256(data).hexdigest(),
    )
    assert right.status_code == 201
    assert Artifact.objects.count() == 1 and len(blob_files(isolated_data_dir)) == 1
    assert tmp_files(isolated_data_dir) == []


def test_size_limit_413_declared_and_streamed(api, settings, isolated_data_dir):
    settings.ARTIFACTS_MAX_SIZE = 1000
    declared = api.generic("POST", "/api/artifacts/?name=big", b"x" * 2000, content_type="application/octet-stream")
    assert declared.status_code == 413
    with pytest.raises(services.ArtifactTooLarge):
        services.artifact_store(source=iter([b"x" * 600, b"x" * 600]), name="streamed")
    assert Artifact.objects.count() == 0 and tmp_files(isolated_data_dir) == [] and blob_files(isolated_data_dir) == []


@pytest.mark.parametrize(
    "query, field",
    [
        ("kind=bogus", "kind"),
        ("metadata=%7B%22a%22%3A%22%5Cu0000%22%7D", "metadata"),
        ("metadata=[1]", "metadata"),
        ("task=nope", "task"),
        ("sha256=xyz", "sha256"),
    ],
)
def test_bad_upload_params(api, query, field):
    response = api.generic("POST", f"/api/artifacts/?name=x&{query}", b"data", content_type="text/plain")
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]
    assert Artifact.objects.count() == 0


def test_unknown_task_refused_and_link_listed_on_task(api, user, repository):
    import uuid

    missing = api.generic("POST", f"/api/artifacts/?name=x&task={uuid.uuid4()}", b"d", content_type="text/plain")
    assert missing.status_code == 400 and "task" in missing.json()["errors"]
    task = task_create(title="t", instructions="i", repository=repository, owner=user)
    made = api.generic(
        "POST", f"/api/artifacts/?name=p.patch&kind=patch&task={task.pk}", b"diff", content_type="text/x-diff"
    )
    assert made.status_code == 201
    listed = api.get(f"/api/tasks/{task.pk}/artifacts/").json()
    assert [(a["name"], a["kind"], a["role"]) for a in listed] == [("p.patch", "patch", "patch")]
    assert api.get("/api/artifacts/", {"task": str(task.pk)}).json()["count"] == 1
    assert api.get("/api/artifacts/", {"kind": "log"}).json()["count"] == 0


def test_names_are_sanitised_and_disposition_safe(api):
    response = api.generic(
        "POST", "/api/artifacts/?name=..%2F..%2Fetc%2Fpa%22ss%0Awd", b"x", content_type="application/octet-stream"
    )
    body = response.json()
    assert body["name"] == 'pa"sswd'
    disposition = api.get(f"/api/artifacts/{body['id']}/content/")["Content-Disposition"]
    assert "\n" not in disposition and "/" not in disposition


def test_range_and_etag(api):
    data = bytes(range(100))
    body = api.generic("POST", "/api/artifacts/?name=r.log&kind=log", data, content_type="text/plain").json()
    url = f"/api/artifacts/{body['id']}/content/"
    part = api.get(url, HTTP_RANGE="bytes=10-19")
    assert part.status_code == 206 and b"".join(part.streaming_content) == data[10:20]
    assert part["Content-Range"] == "bytes 10-19/100" and part["Content-Length"] == "10"
    assert b"".join(api.get(url, HTTP_RANGE="bytes=-5").streaming_content) == data[-5:]
    assert b"".join(api.get(url, HTTP_RANGE="bytes=95-").streaming_content) == data[95:]
    unsatisfiable = api.get(url, HTTP_RANGE="bytes=200-300")
    assert unsatisfiable.status_code == 416 and unsatisfiable["Content-Range"] == "bytes */100"
    malformed = api.get(url, HTTP_RANGE="bytes=1-2,5-6")
    assert malformed.status_code == 200
    etag = api.get(url)["ETag"]
    assert api.get(url, HTTP_IF_NONE_MATCH=etag).status_code == 304
    assert api.get(url, HTTP_IF_NONE_MATCH='"other"').status_code == 200


def test_delete_is_staff_only_and_shared_blobs_survive(api, staff_api, isolated_data_dir):
    data = b"shared bytes"
    a = api.generic("POST", "/api/artifacts/?name=a", data, content_type="text/plain").json()
    b = api.generic("POST", "/api/artifacts/?name=b", data, content_type="text/plain").json()
    assert api.delete(f"/api/artifacts/{a['id']}/").status_code == 403
    assert staff_api.delete(f"/api/artifacts/{a['id']}/").status_code == 204
    assert len(blob_files(isolated_data_dir)) == 1  # b still points at it
    assert staff_api.delete(f"/api/artifacts/{b['id']}/").status_code == 204
    assert blob_files(isolated_data_dir) == []
    assert api.get(f"/api/artifacts/{a['id']}/").status_code == 404
    assert api.get("/api/artifacts/not-a-uuid/").status_code == 404


def test_gc_removes_old_leftovers_and_orphans_only(isolated_data_dir):
    from io import StringIO

    from django.core.management import call_command

    kept = services.artifact_store(source=b"referenced", name="kept")
    orphan = services.artifact_store(source=b"orphan", name="orphan")
    Artifact.objects.filter(pk=orphan.pk).delete()  # a row lost without its blob
    old_tmp = isolated_data_dir / "tmp" / "upload-old.part"
    old_tmp.write_bytes(b"partial")
    young_tmp = isolated_data_dir / "tmp" / "upload-young.part"
    young_tmp.write_bytes(b"in flight")
    long_ago = time.time() - 7200
    os.utime(old_tmp, (long_ago, long_ago))
    for blob in blob_files(isolated_data_dir):
        os.utime(blob, (long_ago, long_ago))
    out = StringIO()
    call_command("artifacts_gc", stdout=out)
    assert "removed 1 temporary file(s), 1 orphan blob(s)" in out.getvalue()
    assert not old_tmp.exists() and young_tmp.exists()
    assert [p.name for p in blob_files(isolated_data_dir)] == [kept.sha256]
    with services.artifact_open(artifact=kept) as handle:
        assert handle.read() == b"referenced"


def test_admin_shows_patch_inline_and_downloads(staff_api):
    patch = b"--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-old\n+new\n"
    artifact = services.artifact_store(source=patch, name="change.patch", kind="patch")
    client = Client()
    client.force_login(staff_api.user)
    page = client.get(f"/admin/artifacts/artifact/{artifact.pk}/change/").content.decode()
    assert 'class="diff"' in page and "+new" in page
    assert client.get("/admin/artifacts/artifact/").status_code == 200
    download = client.get(f"/admin/artifacts/artifact/{artifact.pk}/download/")
    assert b"".join(download.streaming_content) == patch


# --- through the real HTTP stack ----------------------------------------------------------------
@pytest.fixture
def http_token(transactional_db):
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    user = get_user_model().objects.create_user(username="uploader")
    return Token.objects.create(user=user).key


def _post_stream(live_server_url, token, chunks, length, path="/api/artifacts/?name=big.bin&kind=file", headers=None):
    url = urlparse(live_server_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.putrequest("POST", path)
    conn.putheader("Authorization", f"Token {token}")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(length))
    for key, value in (headers or {}).items():
        conn.putheader(key, value)
    conn.endheaders()
    for chunk in chunks:
        conn.send(chunk)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, json.loads(body) if body else None


def test_200mb_upload_streams_with_bounded_memory(live_server, http_token, isolated_data_dir):
    chunk = os.urandom(1024 * 1024)
    count = 200
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(chunk)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        status, body = _post_stream(live_server.url, http_token, (chunk for _ in range(count)), len(chunk) * count)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert status == 201, body
    assert body["size"] == len(chunk) * count and body["sha256"] == digest.hexdigest()
    assert peak < 64 * 1024 * 1024, f"peak memory growth {peak / 1e6:.1f} MB"
    # Download streams back the same bytes.
    url = urlparse(live_server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request("GET", f"/api/artifacts/{body['id']}/content/", headers={"Authorization": f"Token {http_token}"})
    response = conn.getresponse()
    back = hashlib.sha256()
    while data := response.read(1024 * 1024):
        back.update(data)
    conn.close()
    assert back.hexdigest() == digest.hexdigest()


def test_ten_concurrent_uploads(live_server, http_token):
    payloads = [os.urandom(2 * 1024 * 1024 + i) for i in range(10)]
    results: list = [None] * 10

    def upload(i):
        results[i] = _post_stream(
            live_server.url, http_token, [payloads[i]], len(payloads[i]), path=f"/api/artifacts/?name=c{i}.bin"
        )

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (status, body) in enumerate(results):
        assert status == 201, body
        assert body["sha256"] == hashlib.sha256(payloads[i]).hexdigest()
    assert Artifact.objects.count() == 10


def test_interrupted_upload_leaves_nothing(live_server, http_token, isolated_data_dir):
    url = urlparse(live_server.url)
    sock = socket.create_connection((url.hostname, url.port))
    head = (
        "POST /api/artifacts/?name=cut.bin HTTP/1.1\r\n"
        f"Host: {url.hostname}\r\nAuthorization: Token {http_token}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 50000000\r\n\r\n"
    )
    sock.sendall(head.encode() + os.urandom(3 * 1024 * 1024))
    deadline = time.monotonic() + 10
    while not tmp_files(isolated_data_dir) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tmp_files(isolated_data_dir), "the server never started writing the upload"
    sock.close()
    deadline = time.monotonic() + 10
    while tmp_files(isolated_data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tmp_files(isolated_data_dir) == []
    assert blob_files(isolated_data_dir) == []
    assert Artifact.objects.count() == 0


def test_disk_full_is_507_and_leaves_nothing(api, isolated_data_dir):
    import resource
    import signal

    data = os.urandom(3 * 1024 * 1024)
    # A file-size limit makes every write past 1 MiB fail as a full disk would (EFBIG), without
    # needing a real full filesystem; the signal it raises by default is ignored meanwhile.
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, hard))
    try:
        response = api.generic("POST", "/api/artifacts/?name=big.bin", data, content_type="application/octet-stream")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert response.status_code == 507, response.content
    assert response.json()["code"] == "storage_full" and "nothing was stored" in response.json()["detail"]
    assert Artifact.objects.count() == 0 and tmp_files(isolated_data_dir) == [] and blob_files(isolated_data_dir) == []


def test_multipart_sha256_form_field_is_checked(api):
    from django.core.files.uploadedfile import SimpleUploadedFile

    data = b"form upload"
    wrong = api.post(
        "/api/artifacts/", {"file": SimpleUploadedFile("a.txt", data), "sha256": "0" * 64}, format="multipart"
    )
    assert wrong.status_code == 400 and wrong.json()["code"] == "checksum_mismatch"
    right = api.post(
        "/api/artifacts/",
        {"file": SimpleUploadedFile("a.txt", data), "sha256": hashlib.sha256(data).hexdigest()},
        format="multipart",
    )
    assert right.status_code == 201 and Artifact.objects.count() == 1
