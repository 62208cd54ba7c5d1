"""Hostile input gets a 400 that names the field, never a 500, and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from artifacts.models import Artifact
from registry.services import task_create
from repopool.models import Repository

pytestmark = pytest.mark.django_db

ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def stored_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "artifacts").rglob("*") if p.is_file()]


@pytest.fixture
def other_repository(db, make_repo):
    from repopool import services

    return services.repository_create(name="other", url=str(make_repo()), pool_size=1)


# --- repository given by id or name --------------------------------------------------------------
@pytest.mark.parametrize("value", ["²", "①", "߁", "１２"])
@pytest.mark.parametrize("path", ["/api/tasks/", "/api/slots/"])
def test_unicode_digits_in_repository_filter_are_400(staff_api, repository, path, value):
    response = staff_api.get(path, {"repository": value})
    assert response.status_code == 400, response.content
    assert "digits 0-9" in response.json()["errors"]["repository"][0]


@pytest.mark.parametrize("path", ["/api/tasks/", "/api/slots/"])
def test_repository_id_in_arabic_indic_digits_selects_nothing(staff_api, repository, other_repository, path):
    """int("١٢") is 12: the filter must not quietly read another script's digits as an id."""
    api = staff_api  # sees every task and slot
    task_create(title="t", instructions="x", repository=other_repository)
    from repopool.services import pool_warm

    pool_warm(repository=other_repository)
    disguised = str(other_repository.pk).translate(ARABIC_INDIC)
    response = api.get(path, {"repository": disguised})
    assert response.status_code == 400, response.content
    plain = api.get(path, {"repository": str(other_repository.pk)})
    assert plain.status_code == 200 and plain.json()["count"] == 1
    by_name = api.get(path, {"repository": "other"})
    assert by_name.status_code == 200 and by_name.json()["count"] == 1


@pytest.mark.parametrize("path", ["/api/tasks/", "/api/slots/"])
@pytest.mark.parametrize("value", ["sample/../x", "a" * 101, "..", "x;y"])
def test_malformed_repository_filter_is_400(staff_api, repository, path, value):
    response = staff_api.get(path, {"repository": value})
    assert response.status_code == 400 and "repository" in response.json()["errors"]


def test_task_create_with_unicode_digit_repository_is_400(api, repository, other_repository):
    superscript = api.post("/api/tasks/", {"repository": "²", "instructions": "x"}, format="json")
    assert superscript.status_code == 400, superscript.content
    assert "repository" in superscript.json()["errors"]
    disguised = str(other_repository.pk).translate(ARABIC_INDIC)
    response = api.post("/api/tasks/", {"repository": disguised, "instructions": "x"}, format="json")
    assert response.status_code == 400, response.content
    assert "Unknown repository" in response.json()["errors"]["repository"][0]
    ok = api.post("/api/tasks/", {"repository": str(other_repository.pk), "instructions": "x"}, format="json")
    assert ok.status_code == 201 and ok.json()["repository"] == "other"


def test_allocate_with_unicode_digit_repository_is_refused(staff_api, repository):
    response = staff_api.post("/api/slots/allocate/", {"repository": "²", "holder": "me"}, format="json")
    assert response.status_code == 404, response.content
    assert response.json()["code"] == "repository_not_found"


def test_repository_get_reads_ascii_digits_only(repository):
    from repopool.errors import RepositoryNotFound
    from repopool.services import repository_get

    assert repository_get(ref=str(repository.pk)) == repository
    assert repository_get(ref=repository.pk) == repository
    for ref in ("²", str(repository.pk).translate(ARABIC_INDIC)):
        with pytest.raises(RepositoryNotFound):
            repository_get(ref=ref)
    assert Repository.objects.count() == 1


# --- deeply nested JSON --------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [2000, 100_000])
def test_deeply_nested_json_body_is_400(api, repository, depth):
    body = '{"repository": "sample", "instructions": "x", "extra": ' + "[" * depth + "]" * depth + "}"
    response = api.generic("POST", "/api/tasks/", body, content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    assert "nested deeper" in response.json()["detail"]


def test_moderately_nested_json_body_is_400_and_shallow_is_fine(api, repository):
    deep = '{"repository": "sample", "instructions": "x", "extra": ' + "[" * 65 + "]" * 65 + "}"
    assert api.generic("POST", "/api/tasks/", deep, content_type="application/json").status_code == 400
    shallow = '{"repository": "sample", "instructions": "x", "extra": ' + "[" * 10 + "]" * 10 + "}"
    assert api.generic("POST", "/api/tasks/", shallow, content_type="application/json").status_code == 201
    assert api.generic("POST", "/api/tasks/", "null", content_type="application/json").status_code == 400


def test_deeply_nested_upload_metadata_is_400_and_stores_nothing(api, isolated_data_dir):
    from django.core.files.uploadedfile import SimpleUploadedFile

    metadata = "[" * 2000 + "]" * 2000
    raw = api.generic(
        "POST", f"/api/artifacts/?name=a.bin&metadata={metadata}", b"abc", content_type="application/octet-stream"
    )
    assert raw.status_code == 400, raw.content[:300]
    assert "metadata" in raw.json()["errors"]
    nested_object = '{"a": ' + "[" * 40 + "]" * 40 + "}"
    form = api.post(
        "/api/artifacts/", {"file": SimpleUploadedFile("a.txt", b"abc"), "metadata": nested_object}, format="multipart"
    )
    assert form.status_code == 400 and "at most 32 levels" in form.json()["errors"]["metadata"][0]
    assert Artifact.objects.count() == 0 and stored_files(isolated_data_dir) == []


@pytest.mark.parametrize("bad", ['"\\ud800"', '"a\\udfff"', "1e999", "-1e999"])
def test_json_body_the_database_cannot_hold_is_400(staff_api, make_repo, bad):
    """A lone surrogate or an infinite number passes json.loads but not PostgreSQL (a 500)."""
    url = str(make_repo())
    body = f'{{"name": "r1", "url": "{url}", "keep_paths": [{bad}]}}'
    response = staff_api.generic("POST", "/api/repositories/", body, content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    assert "keep_paths.0" in response.json()["detail"]
    assert not Repository.objects.exists()


def test_unicode_that_the_database_holds_is_still_fine(api, repository):
    body = '{"repository": "sample", "instructions": "caf\\u00e9 \\ud83d\\ude00", "title": "Ünïcode"}'
    response = api.generic("POST", "/api/tasks/", body, content_type="application/json")
    assert response.status_code == 201, response.content
    assert response.json()["instructions"] == "café 😀"


@pytest.mark.parametrize("metadata", ['{"a": 1e999}', '{"a": ["\\ud800"]}', '{"\\udfff": 1}'])
def test_upload_metadata_the_database_cannot_hold_is_400_and_stores_nothing(api, isolated_data_dir, metadata):
    from urllib.parse import urlencode

    query = urlencode({"name": "a.bin", "metadata": metadata})
    response = api.generic("POST", f"/api/artifacts/?{query}", b"abc", content_type="application/octet-stream")
    assert response.status_code == 400, response.content[:300]
    assert "metadata" in response.json()["errors"]
    assert Artifact.objects.count() == 0 and stored_files(isolated_data_dir) == []


# --- the upload's Content-Type --------------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type", ["application/" + "x" * 10_000, "text/plain\x01", "not a media type", "a/" + "b" * 200]
)
def test_bad_upload_content_type_is_400_and_stores_nothing(api, isolated_data_dir, content_type):
    response = api.generic("POST", "/api/artifacts/?name=a.bin", b"some bytes", content_type=content_type)
    assert response.status_code == 400, response.content[:300]
    assert "content_type" in response.json()["errors"]
    assert Artifact.objects.count() == 0
    assert stored_files(isolated_data_dir) == []


def test_overlong_multipart_part_content_type_is_400_and_stores_nothing(api, isolated_data_dir):
    from django.core.files.uploadedfile import SimpleUploadedFile

    # Django's multipart parser refuses part headers over 1 KiB itself; 600 characters pass it.
    upload = SimpleUploadedFile("a.bin", b"abc", content_type="application/" + "x" * 600)
    response = api.post("/api/artifacts/", {"file": upload}, format="multipart")
    assert response.status_code == 400, response.content[:300]
    assert "content_type" in response.json()["errors"]
    assert Artifact.objects.count() == 0 and stored_files(isolated_data_dir) == []


def test_ordinary_content_types_still_accepted(api):
    for content_type in ("application/vnd.api+json", "text/plain; charset=utf-8", "image/svg+xml"):
        response = api.generic("POST", "/api/artifacts/?name=a", content_type.encode(), content_type=content_type)
        assert response.status_code == 201, response.content
        assert response.json()["content_type"] == content_type.split(";")[0]
