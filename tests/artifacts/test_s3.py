"""The artifact store on an S3-compatible object store: moto's S3 server on localhost, reached over
real HTTP by django-storages and boto3, exactly as a MinIO or AWS bucket would be."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from artifacts import services
from artifacts.models import Artifact

pytestmark = pytest.mark.django_db


@pytest.fixture
def s3(settings):
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    ).create_bucket(Bucket="artifacts")
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": "artifacts",
                "endpoint_url": endpoint,
                "region_name": "us-east-1",
                "access_key": "test",
                "secret_key": "test",
                "file_overwrite": True,
                "default_acl": None,
            },  # fmt: skip
        },
    }
    yield endpoint
    server.stop()


def test_round_trip_dedupe_range_and_gc_on_s3(s3, api, isolated_data_dir):
    data = os.urandom(3 * 1024 * 1024 + 17)
    first = api.generic("POST", "/api/artifacts/?name=a.bin&kind=file", data, content_type="application/octet-stream")
    assert first.status_code == 201, first.content
    body = first.json()
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    second = api.generic("POST", "/api/artifacts/?name=b.bin", data, content_type="application/octet-stream").json()
    assert second["sha256"] == body["sha256"]
    assert not any((isolated_data_dir / "artifacts").rglob("*.bin"))  # nothing on local disk

    content = api.get(f"/api/artifacts/{body['id']}/content/")
    assert b"".join(content.streaming_content) == data
    part = api.get(f"/api/artifacts/{body['id']}/content/", HTTP_RANGE="bytes=1000-1999")
    assert part.status_code == 206 and b"".join(part.streaming_content) == data[1000:2000]

    from artifacts.storage import blob_storage, walk

    keys = list(walk(blob_storage()))
    assert keys == [f"sha256/{body['sha256'][:2]}/{body['sha256'][2:4]}/{body['sha256']}"]
    services.artifact_delete(artifact_id=body["id"])
    assert list(walk(blob_storage())) == keys  # still referenced by the second record
    Artifact.objects.all().delete()
    removed = services.artifacts_gc(grace_seconds=0)
    assert removed["blobs"] == keys and list(walk(blob_storage())) == []
