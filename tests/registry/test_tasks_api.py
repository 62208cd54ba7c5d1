from __future__ import annotations

import base64
import uuid
from urllib.parse import urlencode

import pytest

from registry import services
from registry.models import Task
from registry.states import TaskStatus

pytestmark = pytest.mark.django_db


def create(api, **fields):
    body = {"instructions": "Fix add()", "repository": "sample", **fields}
    return api.post("/api/tasks/", body, format="json")


def test_create_by_name_and_by_id_queues_task_and_logs_events(api, repository):
    by_name = create(api, title="fix add")
    assert by_name.status_code == 201, by_name.json()
    body = by_name.json()
    assert body["status"] == "queued"
    assert body["base_ref"] == "main"
    assert body["repository"] == "sample"
    by_id = create(api, repository=repository.pk)
    assert by_id.status_code == 201
    assert by_id.json()["title"] == "Fix add()"  # derived from the instructions' first line
    events = api.get(f"/api/tasks/{body['id']}/events/").json()
    assert [e["type"] for e in events] == ["created", "status"]
    assert [e["seq"] for e in events] == [1, 2]
    assert events[1]["data"] == {"from": "pending", "to": "queued", "action": "promote"}


def test_auth_required_everywhere_but_health(client, db):
    assert client.get("/api/tasks/").status_code == 401
    assert client.post("/api/tasks/", {}, content_type="application/json").status_code == 401
    assert client.get("/api/health/").status_code == 200


@pytest.mark.parametrize(
    "fields, field, fragment",
    [
        ({"repository": "nope"}, "repository", "Unknown repository"),
        ({"repository": 999999}, "repository", "Unknown repository"),
        ({"repository": 2**63}, "repository", "Unknown repository"),  # past bigint: no row, not a 500
        ({"repository": str(10**30)}, "repository", "Unknown repository"),
        ({"repository": "9" * 5000}, "repository", "Unknown repository"),  # past what int() reads
        ({"instructions": "   "}, "instructions", "may not be blank"),
        ({"instructions": ""}, "instructions", "may not be blank"),
        ({"timeout_seconds": -5}, "timeout_seconds", "greater than or equal to 1"),
        ({"max_attempts": 0}, "max_attempts", "greater than or equal to 1"),
        ({"max_cost_usd": "-1"}, "max_cost_usd", "greater than or equal to 0"),
        ({"depends_on": ["not-a-uuid"]}, "depends_on", "valid UUID"),
        ({"depends_on": [str(uuid.uuid4())]}, "depends_on", "Unknown task"),
        ({"title": "a\x00b"}, "title", "Null characters are not allowed"),
        ({"instructions": "do\x00it"}, "instructions", "Null characters are not allowed"),
        ({"priority": "high"}, "priority", "valid integer"),
    ],
)
def test_bad_input_names_field_and_reason(api, repository, fields, field, fragment):
    response = create(api, **fields)
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid"
    assert field in body["errors"], body
    assert fragment in str(body["errors"][field]), body
    assert Task.objects.count() == 0


def test_malformed_json_and_oversized_body(api, repository, settings):
    bad = api.post("/api/tasks/", "{not json", content_type="application/json")
    assert bad.status_code == 400 and bad.json()["code"] == "parse_error"
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    huge = create(api, instructions="x" * 20_000)
    assert huge.status_code == 413
    assert "exceeds the limit" in huge.json()["detail"]
    assert Task.objects.count() == 0


def test_malformed_and_unknown_ids_are_404(api, repository):
    assert api.get("/api/tasks/not-a-uuid/").status_code == 404
    assert api.get(f"/api/tasks/{uuid.uuid4()}/").status_code == 404
    assert api.post(f"/api/tasks/{uuid.uuid4()}/cancel/").status_code == 404


def test_list_filters_and_pagination(api, repository, make_repo):
    from repopool.services import repository_create

    other = repository_create(name="other", url=str(make_repo()))
    a = create(api).json()
    create(api, repository="other")
    api.post(f"/api/tasks/{a['id']}/cancel/")
    listing = api.get("/api/tasks/", {"status": "cancelled"}).json()
    assert listing["count"] == 1 and listing["results"][0]["id"] == a["id"]
    assert api.get("/api/tasks/", {"repository": "other"}).json()["count"] == 1
    assert api.get("/api/tasks/", {"repository": str(other.pk)}).json()["count"] == 1
    assert api.get("/api/tasks/", {"page_size": 1}).json()["next"] is not None
    bad = api.get("/api/tasks/", {"status": "bogus"})
    assert bad.status_code == 400 and "status" in bad.json()["errors"]


def test_cancel_and_retry_follow_the_state_machine(api, repository):
    task = create(api).json()
    cancelled = api.post(f"/api/tasks/{task['id']}/cancel/")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["failure_reason"] == "cancelled"
    again = api.post(f"/api/tasks/{task['id']}/cancel/")
    assert again.status_code == 409 and again.json()["code"] == "invalid_transition"
    retried = api.post(f"/api/tasks/{task['id']}/retry/")
    assert retried.status_code == 200 and retried.json()["status"] == "queued"
    assert retried.json()["failure_reason"] == ""


def test_cannot_retry_a_succeeded_task_and_nothing_changes(api, user, repository):
    task = services.task_create(title="t", instructions="i", repository=repository, owner=user)
    _, attempt = services.task_claim(runner_id="r1")
    services.task_finish(task_id=task.pk, attempt_id=attempt.pk, status=TaskStatus.SUCCEEDED)
    before = Task.objects.get(pk=task.pk)
    response = api.post(f"/api/tasks/{task.pk}/retry/")
    assert response.status_code == 409
    after = Task.objects.get(pk=task.pk)
    assert after.status == "succeeded" and after.event_seq == before.event_seq


def test_cancel_running_sets_request_only(api, user, repository):
    task = services.task_create(title="t", instructions="i", repository=repository, owner=user)
    services.task_claim(runner_id="r1")
    response = api.post(f"/api/tasks/{task.pk}/cancel/")
    assert response.status_code == 200
    assert response.json()["status"] == "running"
    assert response.json()["cancel_requested"] is True
    assert services.task_is_cancel_requested(task_id=task.pk)


def test_events_tail_with_after_and_attempts_listing(api, user, repository):
    task = services.task_create(title="t", instructions="i", repository=repository, owner=user)
    services.task_claim(runner_id="runner-7")
    for i in range(5):
        services.event_append(task_id=task.pk, type="progress", message=f"step {i}")
    events = api.get(f"/api/tasks/{task.pk}/events/").json()
    last = events[-1]["seq"]
    assert [e["seq"] for e in events] == list(range(1, last + 1))
    tail = api.get(f"/api/tasks/{task.pk}/events/", {"after": last - 2}).json()
    assert [e["message"] for e in tail] == ["step 3", "step 4"]
    assert api.get(f"/api/tasks/{task.pk}/events/", {"after": -1}).status_code == 400
    attempts = api.get(f"/api/tasks/{task.pk}/attempts/").json()
    assert [(a["number"], a["runner_id"], a["outcome"]) for a in attempts] == [(1, "runner-7", "running")]


def test_events_are_read_only_through_the_api(api, repository):
    task = services.task_create(title="t", instructions="i", repository=repository)
    url = f"/api/tasks/{task.pk}/events/"
    assert api.post(url, {}, format="json").status_code == 405
    assert api.delete(url).status_code == 405
    assert api.delete(f"/api/tasks/{task.pk}/").status_code == 405


def test_dependency_cycle_refused(api, repository):
    a = create(api).json()
    b = create(api, depends_on=[a["id"]]).json()
    assert b["status"] == "pending"
    response = api.put(f"/api/tasks/{a['id']}/dependencies/", {"depends_on": [b["id"]]}, format="json")
    assert response.status_code == 400
    assert response.json()["code"] == "dependency_cycle"
    assert "depends_on" in response.json()["errors"]
    self_loop = api.put(f"/api/tasks/{a['id']}/dependencies/", {"depends_on": [a["id"]]}, format="json")
    assert self_loop.status_code == 400
    assert list(Task.objects.get(pk=a["id"]).depends_on.all()) == []


def test_health_reports_each_check_and_503_when_one_fails(client, db, settings):
    ok = client.get("/api/health/")
    assert ok.status_code == 200
    assert set(ok.json()["checks"]) == {"database", "broker", "storage"}
    settings.CELERY_BROKER_URL = "redis://:s3cret@127.0.0.1:1/0"
    failing = client.get("/api/health/")
    assert failing.status_code == 503
    body = failing.json()
    assert body["status"] == "failing"
    assert body["checks"]["broker"].startswith("failing")
    assert body["checks"]["database"] == "ok"
    assert "s3cret" not in failing.content.decode()


def test_openapi_schema_lists_every_status_code(api):
    response = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert set(paths["/api/tasks/"]["post"]["responses"]) >= {"201", "400", "401", "413"}
    assert set(paths["/api/tasks/{id}/cancel/"]["post"]["responses"]) >= {"200", "404", "409"}
    assert set(paths["/api/health/"]["get"]["responses"]) == {"200", "503"}
    assert "/api/tasks/{id}/events/" in paths
    assert api.get("/api/docs/").status_code == 200


def test_schema_generation_is_clean(tmp_path):
    from django.core.management import call_command

    target = tmp_path / "schema.yml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    assert "/api/artifacts/{id}/content/" in target.read_text()


@pytest.mark.parametrize(
    ("position", "status"),
    [
        ("2026-01-01 00:00:00+16:00", 200),  # Python reads the offset, PostgreSQL does not (past 15:59)
        ("2026-01-01 00:00:00-23:59", 200),
        ("9999-12-31 23:59:59-23:59", 400),  # past year 9999 once in UTC
        ("0001-01-01 00:00:00+23:59", 400),
    ],
)
def test_a_task_list_cursor_whose_date_the_database_would_refuse_is_never_a_500(api, repository, position, status):
    create(api)
    cursor = base64.b64encode(urlencode({"p": position}).encode()).decode()
    response = api.get("/api/tasks/", {"cursor": cursor})
    assert response.status_code == status, response.content[:300]
    if status == 400:
        assert "cursor" in response.json()["errors"]
