"""Reads behind the inspector pages, all scoped by ``tasks_visible_to``: what the API shows a
user is what the pages show (staff everything, others their own tasks)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Count, F, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce, NullIf, TruncDate
from django.http import Http404
from django.utils import timezone

from registry.models import Attempt, Task, TaskArtifact, TaskEvent
from registry.selectors import tasks_visible_to
from registry.states import ACTIVE, TERMINAL, FailureReason, TaskStatus

# What a running task is doing, told by the last event it wrote.
PHASE_OF_EVENT = {
    "status": "starting",
    "claimed": "allocate",
    "slot_leased": "prepare",
    "prepared": "agent",
    "llm_call": "agent",
    "llm_retry": "agent",
    "llm_error": "agent",
    "tool_call": "agent",
    "iteration": "agent",
    "tests": "tests",
    "committed": "artifacts",
    "cancel_requested": "stopping",
}


@dataclass
class RunFilters:
    status: str = ""
    repository: str = ""
    reason: str = ""
    owner: str = ""
    q: str = ""

    @classmethod
    def from_query(cls, query) -> RunFilters:
        def pick(name: str, allowed=None) -> str:
            value = (query.get(name) or "").strip()[:200]
            if "\x00" in value:  # no stored text holds one (PostgreSQL refuses it in a query)
                return ""
            return value if allowed is None or value in allowed else ""

        return cls(
            status=pick("status", TaskStatus.values),
            repository=pick("repository"),
            reason=pick("reason", FailureReason.values),
            owner=pick("owner"),
            q=pick("q"),
        )

    def as_query(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


def run_list(user, filters: RunFilters) -> QuerySet[Task]:
    tasks = tasks_visible_to(user, Task.objects.all())
    if filters.status:
        tasks = tasks.filter(status=filters.status)
    if filters.repository:
        tasks = tasks.filter(repository__name=filters.repository)
    if filters.reason:
        tasks = tasks.filter(failure_reason=filters.reason)
    if filters.owner:
        tasks = tasks.filter(owner__username=filters.owner)
    if filters.q:
        text = Q(title__icontains=filters.q)
        try:
            text |= Q(pk=uuid.UUID(filters.q))
        except ValueError:
            pass
        tasks = tasks.filter(text)
    return tasks.select_related("repository", "owner").order_by("-created_at").defer("instructions", "summary")


def with_live_phase(tasks: list[Task]) -> list[Task]:
    """Give each running task on a page ``live_phase`` from its last event (one query)."""
    running = [t.pk for t in tasks if t.status == TaskStatus.RUNNING]
    last = {}
    if running:
        latest = TaskEvent.objects.filter(task=OuterRef("pk")).order_by("-seq").values("type")[:1]
        last = dict(Task.objects.filter(pk__in=running).annotate(last=Subquery(latest)).values_list("pk", "last"))
    for task in tasks:
        task.live_phase = PHASE_OF_EVENT.get(last.get(task.pk) or "", "running") if task.pk in last else ""
    return tasks


def run_get(user, task_id) -> Task:
    try:
        key = uuid.UUID(str(task_id))
    except ValueError:
        raise Http404("no such run")
    task = tasks_visible_to(user, Task.objects.select_related("repository", "owner")).filter(pk=key).first()
    if task is None:
        raise Http404("no such run")  # another user's run is not found, exactly like a missing one
    return task


def run_attempts(task: Task) -> list[Attempt]:
    return list(task.attempts.order_by("number"))


def run_artifacts(task: Task) -> list[TaskArtifact]:
    return list(task.artifact_links.select_related("artifact").order_by("attempt_number", "role", "created_at"))


def run_events(task: Task, *, after: int = 0, limit: int = 500) -> list[TaskEvent]:
    return list(task.events.filter(seq__gt=after).order_by("seq")[:limit])


def recent_events(task: Task, *, limit: int = 200) -> list[TaskEvent]:
    return list(reversed(task.events.order_by("-seq")[:limit]))


def final_test_event(task: Task, attempt: Attempt) -> TaskEvent | None:
    events = task.events.filter(type="tests", created_at__gte=attempt.started_at)
    if attempt.finished_at:
        events = events.filter(created_at__lte=attempt.finished_at)
    return events.order_by("-seq").first()


# --- dashboard --------------------------------------------------------------------------------------
def _model_expr():
    return Coalesce(NullIf(F("llm_model"), Value("")), Value(settings.AGENTRUNNER_LLM_MODEL))


def dashboard(user, *, days: int = 14) -> dict[str, Any]:
    tasks = tasks_visible_to(user, Task.objects.all())
    now = timezone.now()
    by_status = {row["status"]: row["n"] for row in tasks.order_by().values("status").annotate(n=Count("pk"))}
    windows = {}
    for label, since in (("hour", now - dt.timedelta(hours=1)), ("day", now - dt.timedelta(days=1))):
        finished = tasks.filter(status__in=TERMINAL, finished_at__gte=since)
        rows = finished.order_by().values("status", "failure_reason").annotate(n=Count("pk"))
        summary = {"succeeded": 0, "failed": 0, "cancelled": 0, "reasons": defaultdict(int)}
        for row in rows:
            summary[row["status"]] += row["n"]
            if row["status"] == TaskStatus.FAILED:
                summary["reasons"][row["failure_reason"] or "unknown"] += row["n"]
        summary["reasons"] = sorted(summary["reasons"].items(), key=lambda kv: -kv[1])
        windows[label] = summary
    start = (now - dt.timedelta(days=days - 1)).date()
    per_day_rows = (
        tasks.filter(created_at__date__gte=start)
        .order_by()
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(
            cost=Sum("cost_usd"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            n=Count("pk"),
        )
        .order_by("day")
    )
    per_day = {row["day"]: row for row in per_day_rows}
    days_list = []
    for offset in range(days):
        day = start + dt.timedelta(days=offset)
        row = per_day.get(day, {})
        days_list.append(
            {
                "day": day,
                "cost": row.get("cost") or Decimal(0),
                "tokens": (row.get("prompt") or 0) + (row.get("completion") or 0),
                "tasks": row.get("n") or 0,
            }
        )
    per_model = list(
        tasks.order_by()
        .annotate(model=_model_expr())
        .values("model")
        .annotate(cost=Sum("cost_usd"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), n=Count("pk"))
        .order_by("-cost", "model")
    )
    oldest = tasks.filter(status=TaskStatus.QUEUED).order_by("queued_at").values_list("queued_at", flat=True).first()
    return {
        "by_status": {s: by_status.get(s, 0) for s in TaskStatus.values},
        "active": sum(by_status.get(s, 0) for s in ACTIVE),
        "queue_depth": by_status.get(TaskStatus.QUEUED, 0),
        "running": by_status.get(TaskStatus.RUNNING, 0),
        "oldest_queued_seconds": (now - oldest).total_seconds() if oldest else None,
        "windows": windows,
        "days": days_list,
        "per_model": per_model,
    }


def slot_use() -> list[dict[str, Any]]:
    """Slots by state per repository (operators only: the pool is staff's business)."""
    from repopool.models import Slot

    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, state, n in Slot.objects.order_by().values_list("repository__name", "state").annotate(n=Count("pk")):
        table[name][state] += n
    return [
        {"repository": name, "states": dict(states), "total": sum(states.values())}
        for name, states in sorted(table.items())
    ]
