"""GET /api/tasks/<id>/events/ in cursor pages (``?cursor=``), beside the list it always gave
(``?after=&limit=``): pages in order, no count unless asked, a clear 400 for a bad cursor, and a
page that reads no more rows with 20,000 events than with 20."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from registry import services
from registry.models import TaskEvent

pytestmark = pytest.mark.django_db


def _cursor_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["cursor"][0]


def _task_with_events(repository, owner, n: int):
    task = services.task_create(title="t", instructions="i", repository=repository, owner=owner)
    services.event_append_batch(
        task_id=task.pk, events=[{"type": "progress", "message": f"step {i}"} for i in range(n)]
    )
    return task  # seq 1 and 2 are its creation events, then n progress events


def test_cursor_pages_walk_the_events_in_order_without_a_count(api, user, repository):
    task = _task_with_events(repository, user, 6)  # 8 events
    url = f"/api/tasks/{task.pk}/events/"
    seen, link, pages = [], None, 0
    while True:
        with CaptureQueriesContext(connection) as captured:
            body = api.get(url, {"page_size": 3, "cursor": _cursor_of(link) if link else ""}).json()
        assert set(body) == {"next", "previous", "results"}, body
        assert not any("COUNT(" in q["sql"].upper() for q in captured.captured_queries)
        seen += [e["seq"] for e in body["results"]]
        pages += 1
        link = body["next"]
        if link is None:
            break
    assert seen == list(range(1, 9)) and pages == 3
    assert body["results"][-1] == {
        "seq": 8,
        "type": "progress",
        "message": "step 5",
        "data": {},
        "created_at": body["results"][-1]["created_at"],
    }
    back = api.get(url, {"page_size": 3, "cursor": _cursor_of(body["previous"])}).json()
    assert [e["seq"] for e in back["results"]] == [4, 5, 6]
    # The same events as the list the endpoint has always given.
    assert [e["seq"] for e in api.get(url).json()] == list(range(1, 9))


def test_cursor_pages_start_after_a_seq_and_count_only_when_asked(api, user, repository):
    task = _task_with_events(repository, user, 10)  # 12 events
    url = f"/api/tasks/{task.pk}/events/"
    body = api.get(url, {"cursor": "", "after": 9, "count": "exact"}).json()
    assert body["count"] == 3 and [e["seq"] for e in body["results"]] == [10, 11, 12] and body["next"] is None
    first = api.get(url, {"cursor": "", "page_size": 5}).json()
    assert "count" not in first and len(first["results"]) == 5
    # The next link keeps the filter: a second page after 9 starts at 10 + page size.
    paged = api.get(url, {"cursor": "", "after": 2, "page_size": 4}).json()
    following = api.get(url, {"cursor": _cursor_of(paged["next"]), "after": 2, "page_size": 4}).json()
    assert [e["seq"] for e in paged["results"]] == [3, 4, 5, 6]
    assert [e["seq"] for e in following["results"]] == [7, 8, 9, 10]


def test_without_a_cursor_the_events_are_the_list_they_always_were(api, user, repository):
    task = _task_with_events(repository, user, 5)
    url = f"/api/tasks/{task.pk}/events/"
    listed = api.get(url, {"after": 3, "limit": 2}).json()
    assert isinstance(listed, list) and [e["seq"] for e in listed] == [4, 5]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"cursor": "a"}, "cursor"),  # not base64
        ({"cursor": "cD1ub3QtYS1udW1iZXI="}, "cursor"),  # p=not-a-number
        ({"cursor": "cD0yMDI2LTAxLTAxKzAwJTNBMDA="}, "cursor"),  # a task list's cursor: p=<a date>
        ({"cursor": "", "count": "estimate"}, "count"),
        ({"cursor": "", "limit": 10}, "limit"),  # limit belongs to the list; pages take page_size
        ({"cursor": "", "after": -1}, "after"),
    ],
)
def test_a_bad_events_cursor_is_a_clear_400(api, user, repository, params, field):
    task = _task_with_events(repository, user, 2)
    response = api.get(f"/api/tasks/{task.pk}/events/", params)
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid" and field in body["errors"], body
    assert body["errors"][field][0]  # a reason, not just the field


def test_another_users_task_events_are_not_found_in_pages_either(api, staff_api, repository):
    from django.contrib.auth import get_user_model

    other = get_user_model().objects.create_user(username="bob")
    task = _task_with_events(repository, other, 2)
    assert api.get(f"/api/tasks/{task.pk}/events/", {"cursor": ""}).status_code == 404
    assert len(staff_api.get(f"/api/tasks/{task.pk}/events/", {"cursor": ""}).json()["results"]) == 4


def test_an_events_page_reads_no_more_rows_with_many_events(require_postgres, api, user, repository):
    """The page's own query walks the (task, seq) index from the cursor's position and stops after
    a page: with 20,000 events, a page deep in the log reads as few rows as the first."""
    task = _task_with_events(repository, user, 0)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO registry_taskevent (task_id, seq, type, message, data, created_at) "
            "SELECT %s, g, 'progress', 'step', '{}'::jsonb, now() FROM generate_series(3, 20002) g",
            [task.pk],
        )
        cursor.execute("UPDATE registry_task SET event_seq = 20002 WHERE id = %s", [task.pk])
        cursor.execute("ANALYZE registry_taskevent")
    url = f"/api/tasks/{task.pk}/events/"
    deep = api.get(url, {"cursor": "", "after": 18000, "page_size": 50}).json()
    deep = api.get(url, {"cursor": _cursor_of(deep["next"]), "after": 18000, "page_size": 50})
    with CaptureQueriesContext(connection) as captured:
        response = api.get(url, {"cursor": _cursor_of(deep.json()["next"]), "page_size": 50})
    assert [e["seq"] for e in response.json()["results"]] == list(range(18101, 18151))
    (page_sql,) = [q["sql"] for q in captured.captured_queries if "registry_taskevent" in q["sql"]]
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + page_sql)
        plan = cursor.fetchone()[0]
    plan = json.loads(plan) if isinstance(plan, str) else plan

    def nodes(node):
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    scans = [n for n in nodes(plan[0]["Plan"]) if "Scan" in n["Node Type"]]
    assert [n["Node Type"] for n in scans] in (["Index Scan"], ["Index Only Scan"]), plan
    assert scans[0]["Actual Rows"] <= 51, plan  # a page and one to know there is a next
    assert TaskEvent.objects.filter(task=task).count() == 20002


def test_the_schema_documents_event_pages(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    operation = schema["paths"]["/api/tasks/{id}/events/"]["get"]
    assert {p["name"] for p in operation["parameters"]} >= {"after", "limit", "cursor", "count", "page_size"}
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    component = schema["components"]["schemas"][ok["$ref"].rsplit("/", 1)[1]]
    shapes = component["oneOf"]
    assert {"type": "array", "items": {"$ref": "#/components/schemas/TaskEvent"}} in shapes
    page = schema["components"]["schemas"][next(s["$ref"] for s in shapes if "$ref" in s).rsplit("/", 1)[1]]
    assert set(page["properties"]) == {"count", "next", "previous", "results"}
    assert {"400", "404"} <= set(operation["responses"])
