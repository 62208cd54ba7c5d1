"""What a new user meets first at the edges of the API: unknown routes, wrong methods, the
Authorization header they know, and bodies that are not JSON."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from registry.models import Task

pytestmark = pytest.mark.django_db


def assert_json_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert set(body) >= {"detail", "code"} and body["code"] == code, body
    assert "urlpatterns" not in response.content.decode() and "<html" not in response.content.decode().lower()
    return body


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "production"])
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_unknown_paths_answer_json_to_writes_with_csrf_checks_on(settings, debug, method):
    """A client as browsers and scripts are: CSRF enforced. Writes to an unknown path used to get
    Django's HTML 'CSRF verification failed' page instead of the API's JSON 404."""
    from django.test import Client

    settings.DEBUG = debug
    client = Client(enforce_csrf_checks=True)
    response = getattr(client, method)("/api/nonexistent/", data="{}", content_type="application/json")
    assert_json_error(response, 404, "not_found")


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "production"])
@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/api/tasks/abc/"),
        ("get", "/api/tasks/not-a-uuid/events/"),
        ("get", f"/api/tasks/{uuid.uuid4()}/no-such-action/"),
        ("get", "/api/nothing/"),
        ("get", "/api/"),
        ("delete", "/api/tasks/abc/"),
        ("post", "/api/no/such/route/"),
    ],
)
def test_unknown_api_paths_answer_a_json_404(api, settings, debug, method, path):
    settings.DEBUG = debug
    body = assert_json_error(getattr(api, method)(path), 404, "not_found")
    assert path in body["detail"]


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "production"])
def test_unknown_paths_answer_json_without_credentials_too(client, settings, debug):
    settings.DEBUG = debug
    assert_json_error(client.get("/api/tasks/abc/"), 404, "not_found")


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "production"])
@pytest.mark.parametrize(
    "method, path",
    [("delete", "/api/tasks/"), ("put", "/api/health/"), ("patch", "/api/artifacts/"), ("get", "/api/slots/allocate/")],
)
def test_wrong_methods_answer_a_json_405(staff_api, settings, debug, method, path):
    settings.DEBUG = debug  # as staff: the slot endpoints refuse other users before the method
    body = assert_json_error(getattr(staff_api, method)(path), 405, "method_not_allowed")
    assert method.upper() in body["detail"]


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "production"])
def test_a_missing_trailing_slash_redirects_reads_and_explains_writes(api, repository, settings, debug):
    settings.DEBUG = debug
    read = api.get("/api/tasks", {"status": "queued"})
    assert read.status_code == 301 and read["Location"] == "/api/tasks/?status=queued"
    # Before: with DEBUG on, Django raised RuntimeError (a 500); with it off, a redirect that drops the body.
    write = api.post("/api/tasks", {"instructions": "x", "repository": "sample"}, format="json")
    body = assert_json_error(write, 404, "not_found")
    assert "/api/tasks/" in body["detail"] and "trailing slash" in body["detail"]
    assert Task.objects.count() == 0


def test_an_unexpected_error_under_api_answers_json_without_details(rf):
    from django.urls import get_resolver

    handler = get_resolver().resolve_error_handler(500)
    api_response = handler(rf.get("/api/tasks/"))
    assert api_response.status_code == 500 and api_response["Content-Type"] == "application/json"
    assert api_response.content == b'{"detail": "Internal server error.", "code": "server_error"}'
    page = handler(rf.get("/admin/"))
    assert page.status_code == 500 and page["Content-Type"].startswith("text/html")


def test_a_disallowed_host_under_api_answers_json_in_production(api, settings):
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = ["agentrunner.example"]
    client = api.__class__(raise_request_exception=False)
    assert_json_error(client.get("/api/tasks/", HTTP_HOST="evil.example"), 400, "bad_request")
    page = client.get("/admin/", HTTP_HOST="evil.example")
    assert page.status_code == 400 and page["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "Token"])
def test_bearer_and_token_prefixes_both_authenticate(user, repository, scheme):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"{scheme} {Token.objects.create(user=user).key}")
    assert client.get("/api/tasks/").status_code == 200
    created = client.post("/api/tasks/", {"instructions": "x", "repository": "sample"}, format="json")
    assert created.status_code == 201, created.content


@pytest.mark.parametrize(
    "header, fragment",
    [
        ("Bearer not-a-real-token", "Invalid token"),
        ("Bearer", "give the scheme and the token"),
        ("Bearer two parts", "give the scheme and the token"),
    ],
)
def test_a_bad_bearer_token_is_refused_with_a_reason(db, header, fragment):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    body = assert_json_error(client.get("/api/tasks/"), 401, "authentication_failed")
    assert fragment in body["detail"]


def test_a_token_speaks_for_its_own_user_and_an_inactive_user_is_refused(user, repository):
    """The token lookup is compiled by hand (common.rows): the user it yields is the token's, with
    DRF's answers for an unknown key and an inactive user."""
    other = get_user_model().objects.create_user(username="other")
    mine, theirs = Token.objects.create(user=user), Token.objects.create(user=other)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {theirs.key}")
    created = client.post("/api/tasks/", {"instructions": "x", "repository": "sample"}, format="json").json()
    assert created["owner"] == "other"
    client.credentials(HTTP_AUTHORIZATION=f"Token {mine.key}")
    assert client.get(f"/api/tasks/{created['id']}/").status_code == 404  # not the other user's task
    other.is_active = False
    other.save()
    client.credentials(HTTP_AUTHORIZATION=f"Token {theirs.key}")
    body = assert_json_error(client.get("/api/tasks/"), 401, "authentication_failed")
    assert body["detail"] == "User inactive or deleted."
    client.credentials(HTTP_AUTHORIZATION="Token ab\x00cd")
    assert assert_json_error(client.get("/api/tasks/"), 401, "authentication_failed")["detail"] == "Invalid token."


def test_schema_declares_token_and_bearer_as_alternatives(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The same API token, sent as 'Bearer <token>'.",
    }
    assert schemes["tokenAuth"]["in"] == "header" and schemes["tokenAuth"]["name"] == "Authorization"
    security = schema["paths"]["/api/tasks/"]["get"]["security"]
    assert {"tokenAuth": []} in security and {"bearerAuth": []} in security


@pytest.mark.parametrize(
    "content_type, data",
    [
        ("application/x-www-form-urlencoded", "repository=sample&instructions=fix+it"),
        ("", "repository=sample&instructions=fix+it"),
        (
            "multipart/form-data; boundary=XyZ",
            '--XyZ\r\nContent-Disposition: form-data; name="repository"\r\n\r\nsample\r\n--XyZ--\r\n',
        ),
        ("text/plain", '{"repository": "sample", "instructions": "fix it"}'),
    ],
    ids=["urlencoded", "no-content-type", "multipart", "text-plain"],
)
def test_a_body_that_is_not_json_is_refused_with_415_saying_so(api, repository, content_type, data):
    response = api.generic("POST", "/api/tasks/", data, content_type=content_type)
    body = assert_json_error(response, 415, "unsupported_media_type")
    assert "Send a JSON body with Content-Type: application/json." in body["detail"]
    assert "errors" not in body  # not "repository: This field is required"
    assert Task.objects.count() == 0


def test_json_endpoints_still_accept_json_and_empty_bodies(api, repository):
    created = api.post("/api/tasks/", {"instructions": "fix it", "repository": "sample"}, format="json")
    assert created.status_code == 201, created.content
    # An action without a body, sent by curl -X POST (no content type), is not a "wrong media type".
    cancelled = api.generic("POST", f"/api/tasks/{created.json()['id']}/cancel/", "", content_type="")
    assert cancelled.status_code == 200, cancelled.content
