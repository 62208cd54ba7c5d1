"""The run inspector: server-rendered pages over the registry, beside the admin.

Views are thin: read through ``inspector.selectors`` (scoped to what the user may see), present
with ``inspector.present``, and act only through ``registry.services``."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import EmptyPage, Paginator
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from artifacts.services import artifact_open
from common.errors import DomainError
from common.permissions import is_staff
from inspector import present, selectors
from registry import services
from registry.states import ACTIVE, FailureReason, TaskStatus

PAGE_SIZE = 50
TRANSCRIPT_PAGE = 25


def _int(value, default: int, *, low: int = 1, high: int = 10**9) -> int:
    try:
        return min(max(int(value), low), high)
    except (TypeError, ValueError):
        return default


@login_required
@require_GET
def run_list(request: HttpRequest) -> HttpResponse:
    filters = selectors.RunFilters.from_query(request.GET)
    paginator = Paginator(selectors.run_list(request.user, filters), PAGE_SIZE)
    try:
        page = paginator.page(_int(request.GET.get("page"), 1))
    except EmptyPage:
        page = paginator.page(paginator.num_pages)
    # The page's ids first (an index walk, however deep the page), then those rows with their joins.
    ids = list(page.object_list.values_list("pk", flat=True))
    rows = {task.pk: task for task in selectors.run_list(request.user, selectors.RunFilters()).filter(pk__in=ids)}
    tasks = selectors.with_live_phase([rows[pk] for pk in ids if pk in rows])
    context = {
        "page": page,
        "tasks": tasks,
        "filters": filters,
        "query": filters.as_query(),
        "statuses": TaskStatus.values,
        "reasons": FailureReason.values,
        "now": timezone.now(),
        "live": any(t.status in ACTIVE for t in tasks),
        "staff": is_staff(request.user),
    }
    if request.GET.get("fragment") == "rows":
        return render(request, "inspector/_run_rows.html", context)
    from repopool.models import Repository

    context["repositories"] = Repository.objects.order_by("name").values_list("name", flat=True)
    return render(request, "inspector/run_list.html", context)


def _read_text(link, limit: int) -> tuple[str, bool]:
    """An artifact's first ``limit`` bytes as text; True when it was cut."""
    if link is None:
        return "", False
    with artifact_open(artifact=link.artifact) as handle:
        data = handle.read(limit + 1)
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def _tail_text(link, limit: int) -> str:
    if link is None:
        return ""
    size = link.artifact.size
    with artifact_open(artifact=link.artifact) as handle:
        if size > limit:
            handle.seek(size - limit)
        data = handle.read(limit)
    return data.decode("utf-8", "replace")


def _fill_diff(context: dict, link, **_) -> None:
    patch, cut = _read_text(link, settings.AGENTRUNNER_INSPECTOR_DIFF_MAX)
    context["diff_files"], diff_cut = present.parse_diff(patch)
    context["diff_cut"] = cut or diff_cut


def _fill_report(context: dict, link, *, task, attempt, **_) -> None:
    if link is None:
        return
    context["report"] = present.report_tail(_tail_text(link, 256 * 1024))
    event = selectors.final_test_event(task, attempt)
    if event is not None and context["report"]["exit_code"] is None:
        context["report"]["exit_code"] = event.data.get("exit_code")


def _fill_transcript(context: dict, link, *, request, **_) -> None:
    if link is None:
        return
    page = _int(request.GET.get("tpage"), 1)
    with artifact_open(artifact=link.artifact) as handle:
        context["transcript"] = present.transcript_page(handle, page=page, per_page=TRANSCRIPT_PAGE)


@login_required
@require_GET
def run_detail(request: HttpRequest, task_id) -> HttpResponse:
    task = selectors.run_get(request.user, task_id)
    attempts = selectors.run_attempts(task)
    chosen = _int(request.GET.get("attempt"), attempts[-1].number if attempts else 0, low=0)
    attempt = next((a for a in attempts if a.number == chosen), attempts[-1] if attempts else None)
    links = selectors.run_artifacts(task)
    events = selectors.recent_events(task)
    mine = {}
    if attempt is not None:
        for link in links:
            if link.attempt_number == attempt.number:
                mine[link.role] = link
    context = {
        "task": task,
        "attempts": attempts,
        "attempt": attempt,
        "links": links,
        "now": timezone.now(),
        "active": task.status in ACTIVE,
        "can_cancel": task.status in ACTIVE and not task.cancel_requested,
        "can_retry": task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED),
        "events": events,
        "last_seq": events[-1].seq if events else 0,
    }
    if attempt is not None:
        context["timeline"] = present.timeline(attempt.metrics or {})
        context["attempt_elapsed"] = ((attempt.finished_at or context["now"]) - attempt.started_at).total_seconds()
        context["unreadable"] = unreadable = []
        for role, fill in (("patch", _fill_diff), ("test_report", _fill_report), ("transcript", _fill_transcript)):
            link = mine.get(role)
            try:
                fill(context, link, request=request, task=task, attempt=attempt)
            except (OSError, DomainError) as exc:  # a blob gone from storage: say so, keep the page
                unreadable.append(f"{role}: {getattr(exc, 'message', None) or type(exc).__name__}")
    return render(request, "inspector/run_detail.html", context)


@login_required
@require_GET
def run_events(request: HttpRequest, task_id) -> JsonResponse:
    """New events after ``after`` plus the task's status: a short request the page polls."""
    task = selectors.run_get(request.user, task_id)
    after = _int(request.GET.get("after"), 0, low=0)
    events = selectors.run_events(task, after=after)
    return JsonResponse(
        {
            "status": task.status,
            "cancel_requested": task.cancel_requested,
            "active": task.status in ACTIVE,
            "attempts": task.attempts_count,
            "events": [
                {
                    "seq": e.seq,
                    "type": e.type,
                    "message": e.message,
                    "data": e.data,
                    "time": e.created_at.strftime("%H:%M:%S"),
                }
                for e in events
            ],
        }
    )


def _act(request: HttpRequest, task_id, service, done: str) -> HttpResponse:
    task = selectors.run_get(request.user, task_id)
    try:
        service(task_id=task.pk)
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, done)
    return redirect(reverse("inspector:run", args=[task.pk]))


@login_required
@require_POST
def run_cancel(request: HttpRequest, task_id) -> HttpResponse:
    return _act(request, task_id, services.task_cancel, "Cancel requested.")


@login_required
@require_POST
def run_retry(request: HttpRequest, task_id) -> HttpResponse:
    return _act(request, task_id, services.task_retry, "Sent back to the queue.")


@login_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    data = selectors.dashboard(request.user)
    peak_cost = max((d["cost"] for d in data["days"]), default=0) or 1
    peak_tokens = max((d["tokens"] for d in data["days"]), default=0) or 1
    for index, day in enumerate(data["days"]):
        day["x"] = index * 22
        day["cost_h"] = round(80 * float(day["cost"]) / float(peak_cost), 1)
        day["tokens_h"] = round(80 * day["tokens"] / peak_tokens, 1)
        day["cost_y"] = round(90 - day["cost_h"], 1)
        day["tokens_y"] = round(90 - day["tokens_h"], 1)
    statuses = data["by_status"]
    total = sum(statuses.values()) or 1
    offset = 0.0
    bars = []
    for status, count in statuses.items():
        width = 100 * count / total
        bars.append({"status": status, "count": count, "x": offset, "w": width})
        offset += width
    slots = selectors.slot_use() if is_staff(request.user) else None
    if slots:
        for row in slots:
            row["bars"] = []
            x = 0.0
            for state, n in sorted(row["states"].items()):
                w = 100 * n / row["total"]
                row["bars"].append({"state": state, "n": n, "x": x, "w": w})
                x += w
    return render(
        request,
        "inspector/dashboard.html",
        {"d": data, "status_bars": bars, "slots": slots, "chart_width": len(data["days"]) * 22},
    )
