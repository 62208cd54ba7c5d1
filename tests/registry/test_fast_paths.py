"""The registry's hot paths stay short: statements per task creation, event append and claim, and
list pages whose cost does not grow with the table (cursor pages, no COUNT unless asked)."""

from __future__ import annotations

import threading
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from common.errors import DomainError
from registry import services
from registry.errors import TaskNotFound
from registry.models import Attempt, Task, TaskEvent
from tests.registry.test_services import _in_threads, make

pytestmark = pytest.mark.django_db

# Statements a task creation may take; it took 24 (two events of UPDATE + SELECT + INSERT under
# savepoints, then a promotion that locked, updated and re-read the row).
CREATE_STATEMENTS_MAX = 8


def statements(captured) -> list[str]:
    """The SQL that reached the server (savepoint bookkeeping included: it is a round trip too)."""
    return [q["sql"] for q in captured.captured_queries]


def test_task_create_takes_a_handful_of_statements(repository):
    done = make(repository)
    Task.objects.filter(pk=done.pk).update(status="succeeded")
    waiting = make(repository)
    with CaptureQueriesContext(connection) as plain:
        task = make(repository)
    with CaptureQueriesContext(connection) as with_deps:
        blocked = make(repository, depends_on=[done, waiting])
        ready = make(repository, depends_on=[done])
    assert len(statements(plain)) <= CREATE_STATEMENTS_MAX, statements(plain)
    if connection.vendor == "postgresql":  # the task and its two events in one statement
        assert len(statements(plain)) == 1, statements(plain)
    assert len(statements(with_deps)) <= 2 * CREATE_STATEMENTS_MAX, statements(with_deps)
    # What the statements do is unchanged: queued with its two events, or pending until its
    # dependencies are done, which still gates it.
    for t, status, types in [
        (task, "queued", ["created", "status"]),
        (blocked, "pending", ["created"]),
        (ready, "queued", ["created", "status"]),
    ]:
        stored = Task.objects.get(pk=t.pk)
        assert (t.status, stored.status) == (status, status)
        events = list(TaskEvent.objects.filter(task=t).order_by("seq"))
        assert [e.type for e in events] == types and [e.seq for e in events] == list(range(1, len(types) + 1))
        assert stored.event_seq == t.event_seq == len(types)
        assert (stored.queued_at is not None) == (status == "queued")
    assert set(blocked.depends_on.values_list("pk", flat=True)) == {done.pk, waiting.pk}
    assert TaskEvent.objects.get(task=task, type="status").data == {
        "from": "pending",
        "to": "queued",
        "action": "promote",
    }
    assert TaskEvent.objects.get(task=blocked, type="created").data == {"depends_on": [str(done.pk), str(waiting.pk)]}
    services.task_finish(
        task_id=waiting.pk, attempt_id=services.task_claim(runner_id="r", task_id=waiting.pk)[1].pk, status="succeeded"
    )
    assert Task.objects.get(pk=blocked.pk).status == "queued"


def test_a_task_created_after_its_dependency_failed_fails_at_once(repository):
    dead = make(repository)
    services.task_cancel(task_id=dead.pk)
    task = make(repository, depends_on=[dead])
    assert task.status == "failed" and task.failure_reason == "dependency_failed"
    assert [e.type for e in TaskEvent.objects.filter(task=task).order_by("seq")] == ["created", "status"]


def test_post_task_through_the_api_takes_a_handful_of_statements(api, repository):
    with CaptureQueriesContext(connection) as captured:
        response = api.post("/api/tasks/", {"instructions": "Fix add()", "repository": "sample"}, format="json")
    assert response.status_code == 201, response.json()
    assert len(statements(captured)) <= CREATE_STATEMENTS_MAX, statements(captured)


def test_event_append_batch_numbers_in_order_and_bounds_every_string(repository):
    task = make(repository)  # seq 1 and 2 are its creation events
    long = "x" * (services.EVENT_MESSAGE_MAX + 50)
    seqs = services.event_append_batch(
        task_id=task.pk,
        events=[
            {"type": "progress", "message": "one"},
            {"type": "progress", "data": {"path": long, "items": list(range(services.EVENT_ITEMS_MAX + 5))}},
            {"type": "t" * 100, "message": long},
        ],
    )
    assert seqs == [3, 4, 5]
    events = list(TaskEvent.objects.filter(task=task, seq__gte=3).order_by("seq"))
    assert [e.message for e in events][0] == "one"
    assert len(events[1].data["path"]) < services.EVENT_STRING_MAX + 40
    assert len(events[1].data["items"]) == services.EVENT_ITEMS_MAX
    assert events[2].type == "t" * 64 and len(events[2].message) < services.EVENT_MESSAGE_MAX + 40
    assert Task.objects.get(pk=task.pk).event_seq == 5
    assert services.event_append_batch(task_id=task.pk, events=[]) == []
    assert services.event_append(task_id=task.pk, type="single").seq == 6


@pytest.mark.parametrize(
    "bad",
    [
        {"message": "no type"},
        {"type": ""},
        {"type": 3},
        {"type": "x", "data": "not an object"},
        {"type": "x", "y": 1},
        "x",
    ],
)
def test_event_append_batch_refuses_a_bad_event_and_appends_nothing(repository, bad):
    task = make(repository)
    with pytest.raises(DomainError) as refused:
        services.event_append_batch(task_id=task.pk, events=[{"type": "fine"}, bad])
    assert refused.value.field == "events"
    assert TaskEvent.objects.filter(task=task).count() == 2


def test_event_append_batch_refuses_too_many_events(repository):
    task = make(repository)
    with pytest.raises(DomainError) as refused:
        services.event_append_batch(task_id=task.pk, events=[{"type": "x"}] * (services.EVENT_BATCH_MAX + 1))
    assert refused.value.field == "events" and TaskEvent.objects.filter(task=task).count() == 2
    assert len(services.event_append_batch(task_id=task.pk, events=[{"type": "x"}] * services.EVENT_BATCH_MAX)) == 1000


@pytest.mark.parametrize("task_id", [uuid.uuid4(), "not-a-uuid"])
def test_events_for_an_unknown_task_are_refused(db, task_id):
    with pytest.raises(TaskNotFound):
        services.event_append_batch(task_id=task_id, events=[{"type": "x"}])
    with pytest.raises(TaskNotFound):
        services.event_append(task_id=task_id, type="x")
    assert not TaskEvent.objects.exists()


def test_event_append_and_batch_are_one_statement_on_postgresql(require_postgres, repository):
    task = make(repository)
    with CaptureQueriesContext(connection) as one:
        services.event_append(task_id=task.pk, type="progress", data={"n": 1})
    with CaptureQueriesContext(connection) as batch:
        services.event_append_batch(
            task_id=task.pk, events=[{"type": "progress", "data": {"n": n}} for n in range(200)]
        )
    assert len(statements(one)) == 1, statements(one)
    assert len(statements(batch)) == 1, statements(batch)
    assert Task.objects.get(pk=task.pk).event_seq == 2 + 1 + 200


@pytest.mark.django_db(transaction=True)
def test_concurrent_batches_and_single_appends_never_share_or_skip_a_number(require_postgres, repository):
    task = make(repository)
    lock = threading.Lock()
    batches: list[list[int]] = []

    def writer(i):
        for n in range(5):
            if i % 2:
                got = services.event_append_batch(
                    task_id=task.pk, events=[{"type": "batch", "data": {"w": i, "n": n, "k": k}} for k in range(10)]
                )
                with lock:
                    batches.append(got)
            else:
                services.event_append(task_id=task.pk, type="single", data={"w": i, "n": n})

    _in_threads(8, writer)
    seqs = list(TaskEvent.objects.filter(task=task).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, 2 + 4 * 5 * 10 + 4 * 5 + 1))
    for got in batches:  # a batch's numbers are consecutive, in the order given
        assert got == list(range(got[0], got[0] + 10))
        ks = [e.data["k"] for e in TaskEvent.objects.filter(task=task, seq__in=got).order_by("seq")]
        assert ks == list(range(10))


def test_claim_is_one_statement_on_postgresql(require_postgres, repository):
    from decimal import Decimal

    task = make(repository, priority=1, max_cost_usd=Decimal("2.5"), llm_config={"provider": "replay"})
    make(repository)
    with CaptureQueriesContext(connection) as captured:
        claimed, attempt = services.task_claim(runner_id="runner-a")
    assert len(statements(captured)) == 1, statements(captured)
    stored = Task.objects.get(pk=task.pk)
    assert claimed.pk == task.pk and claimed.status == stored.status == "running"
    assert claimed.attempts_count == stored.attempts_count == 1 and claimed.event_seq == stored.event_seq == 3
    assert claimed.started_at == stored.started_at and claimed.repository_id == repository.pk
    # Every column comes back as the ORM would load it (JSON decoded, decimals, the repository).
    assert claimed.llm_config == {"provider": "replay"} and claimed.test_results == {}
    assert claimed.max_cost_usd == Decimal("2.5") and claimed.repository.name == repository.name
    row = Attempt.objects.get(task=task)
    assert (attempt.pk, attempt.number, attempt.runner_id, attempt.outcome) == (row.pk, 1, "runner-a", "running")
    assert row.heartbeat_at == attempt.heartbeat_at and row.metrics == {}
    event = TaskEvent.objects.get(task=task, seq=3)
    assert (event.type, event.message) == ("claimed", "claimed by runner-a (attempt 1)")
    assert event.data == {"runner_id": "runner-a", "attempt": 1, "from": "queued", "to": "running"}
    services.task_claim(runner_id="runner-a")
    with CaptureQueriesContext(connection) as empty:
        assert services.task_claim(runner_id="runner-a") is None
    assert len(statements(empty)) == 1


def test_claim_uses_the_partial_index_of_runnable_tasks(require_postgres, repository):
    Task.objects.bulk_create(
        Task(title=f"t{i}", instructions="x", repository=repository, status="queued" if i % 50 == 0 else "succeeded")
        for i in range(5000)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE registry_task")
        cursor.execute("EXPLAIN " + services._claim_sql(named=False), services._claim_params("r", None))
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "task_runnable" in plan, plan


def _cursor_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["cursor"][0]


def test_cursor_pages_walk_the_list_newest_first_without_a_count(staff_api, repository):
    ids = [str(make(repository, title=f"t{i}").pk) for i in range(7)][::-1]  # newest first
    seen, link, pages = [], None, 0
    while True:
        params = {"page_size": 3, "cursor": _cursor_of(link) if link else ""}
        with CaptureQueriesContext(connection) as captured:
            body = staff_api.get("/api/tasks/", params).json()
        assert "count" not in body
        assert not any("COUNT(" in sql.upper() for sql in statements(captured)), statements(captured)
        seen += [t["id"] for t in body["results"]]
        pages += 1
        link = body["next"]
        if link is None:
            break
    assert seen == ids and pages == 3
    back = staff_api.get("/api/tasks/", {"cursor": _cursor_of(body["previous"]), "page_size": 3}).json()
    assert [t["id"] for t in back["results"]] == ids[3:6]
    counted = staff_api.get("/api/tasks/", {"cursor": "", "count": "exact", "status": "queued"}).json()
    assert counted["count"] == 7 and len(counted["results"]) == 7
    paged = staff_api.get("/api/tasks/", {"page": 2, "page_size": 3}).json()  # page numbers still work
    assert paged["count"] == 7 and [t["id"] for t in paged["results"]] == ids[3:6]


def test_cursor_pages_show_a_user_only_their_own_tasks(api, user, repository):
    mine = make(repository, owner=user)
    make(repository)  # an operator's task
    body = api.get("/api/tasks/", {"cursor": "", "count": "exact"}).json()
    assert body["count"] == 1 and [t["id"] for t in body["results"]] == [str(mine.pk)]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"cursor": "a"}, "cursor"),  # not base64
        ({"cursor": "cD1ub3QtYS1kYXRl"}, "cursor"),  # p=not-a-date
        ({"cursor": "", "count": "estimate"}, "count"),
    ],
)
def test_a_bad_cursor_or_count_is_a_clear_400(staff_api, repository, params, field):
    make(repository)
    response = staff_api.get("/api/tasks/", params)
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]


def test_the_direct_representations_equal_the_declared_fields(user, repository):
    """TaskSerializer and TaskEventSerializer build their JSON directly; DRF's walk over the
    declared fields must give the same bytes for every kind of value."""
    from decimal import Decimal

    from rest_framework import serializers as drf
    from rest_framework.renderers import JSONRenderer

    from registry.serializers import TaskEventSerializer, TaskSerializer, attach_dependency_ids

    first = make(repository, owner=user, max_cost_usd=Decimal("1.5"), max_steps=7, llm_model="m")
    second = make(repository, depends_on=[first], priority=-3, test_command="pytest -q")
    services.task_claim(runner_id="r", task_id=first.pk)
    Task.objects.filter(pk=first.pk).update(
        cost_usd=Decimal("0.123456"), tests_passed=False, test_results={"failed": 1, "names": ["t"]}, summary="é"
    )
    services.task_add_usage(task_id=first.pk, prompt_tokens=5, completion_tokens=7, cost_usd=Decimal("0.01"))
    render = JSONRenderer().render
    for task in Task.objects.all():
        serializer = TaskSerializer()
        assert render(serializer.to_representation(task)) == render(
            drf.ModelSerializer.to_representation(serializer, task)
        )
    listed = list(Task.objects.order_by("created_at"))
    attach_dependency_ids(listed)
    assert [t.dependency_ids for t in listed] == [[], [first.pk]]
    assert render(TaskSerializer(listed, many=True).data) == render(
        [drf.ModelSerializer.to_representation(TaskSerializer(), t) for t in Task.objects.order_by("created_at")]
    )
    for event in TaskEvent.objects.all():
        serializer = TaskEventSerializer()
        assert render(serializer.to_representation(event)) == render(
            drf.ModelSerializer.to_representation(serializer, event)
        )
    assert second.pk


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris"])
def test_the_direct_datetimes_equal_drfs_in_any_active_zone(zone):
    """The direct representations skip DRF's time zone lookup while the active zone is UTC; the
    strings stay DRF's for values in other zones, naive values and another active zone."""
    import datetime
    from zoneinfo import ZoneInfo

    from django.utils import timezone

    from registry.serializers import _DATETIME, _datetime_json

    values = [
        None,
        datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        datetime.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=datetime.UTC),
        datetime.datetime(2026, 7, 2, 3, 4, 5, tzinfo=ZoneInfo("Europe/Paris")),
        datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
        datetime.datetime(2026, 1, 2, 3, 4, 5),
    ]
    with timezone.override(zone):
        direct = _datetime_json()
        assert [direct(v) for v in values] == [_DATETIME.to_representation(v) for v in values]
