from __future__ import annotations

from datetime import datetime, timedelta

from django.contrib import admin, messages
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html

from common.errors import DomainError
from registry import services
from registry.models import Attempt, Task, TaskArtifact, TaskEvent


def with_seconds(value: datetime | None) -> str:
    """Times in lists and inlines to the second (Django's default format stops at minutes)."""
    return date_format(timezone.localtime(value), "Y-m-d H:i:s") if value else "—"


def human_duration(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def stacked_time(value: datetime | None) -> str:
    """Date above time, so a narrow list column never breaks inside the date."""
    if not value:
        return "—"
    local = timezone.localtime(value)
    return format_html("{}<br>{}", date_format(local, "Y-m-d"), date_format(local, "H:i:s"))


class ReadOnlyAdmin(admin.ModelAdmin):
    """Inspect-only pages: Django's view-only form (no Save buttons, no Delete). Every change goes
    through an admin action that calls a service."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class TaskEventInline(ReadOnlyInline):
    model = TaskEvent
    fields = ["seq", "time", "type", "message", "data"]
    readonly_fields = fields
    ordering = ["seq"]

    @admin.display(description="time", ordering="created_at")
    def time(self, obj):
        return with_seconds(obj.created_at)


class AttemptInline(ReadOnlyInline):
    model = Attempt
    fields = [
        "number",
        "runner_id",
        "slot",
        "started",
        "finished",
        "outcome",
        "failure_reason",
        "message",
        "metrics",
    ]
    readonly_fields = fields

    @admin.display(description="started", ordering="started_at")
    def started(self, obj):
        return with_seconds(obj.started_at)

    @admin.display(description="finished", ordering="finished_at")
    def finished(self, obj):
        return with_seconds(obj.finished_at)


class TaskArtifactInline(ReadOnlyInline):
    model = TaskArtifact
    fields = ["role", "artifact", "attempt_number", "created_at", "links"]
    readonly_fields = fields

    @admin.display(description="open")
    def links(self, obj):
        return format_html(
            '<a href="/admin/artifacts/artifact/{0}/change/">view</a> · '
            '<a href="/admin/artifacts/artifact/{0}/download/">download</a>',
            obj.artifact_id,
        )


def _apply(modeladmin, request, queryset, service, verb):
    done = 0
    for task in queryset:
        try:
            service(task_id=task.pk)
            done += 1
        except DomainError as exc:
            modeladmin.message_user(request, f"{task.title}: {exc.message}", messages.WARNING)
    if done:
        modeladmin.message_user(request, f"{verb} {done} task(s).", messages.SUCCESS)


@admin.action(description="Cancel selected tasks")
def cancel_tasks(modeladmin, request, queryset):
    _apply(modeladmin, request, queryset, services.task_cancel, "Cancelled (or asked to stop)")


@admin.action(description="Retry selected tasks")
def retry_tasks(modeladmin, request, queryset):
    _apply(modeladmin, request, queryset, services.task_retry, "Retried")


@admin.register(Task)
class TaskAdmin(ReadOnlyAdmin):
    # Few columns, so cost, finished and duration stay on screen at 1,400 px with the admin's
    # sidebar and filters open: the repository rides under the title, the failure reason under the
    # status badge; priority and tokens are on the task's page.
    list_display = ["task", "status_badge", "attempts", "cost", "created", "finished", "duration", "inspector_link"]
    list_display_links = ["task"]
    list_filter = ["status", "repository", "failure_reason"]
    search_fields = ["id", "title", "instructions", "result_branch", "result_commit"]
    actions = [cancel_tasks, retry_tasks]
    inlines = [AttemptInline, TaskArtifactInline, TaskEventInline]
    readonly_fields = [f.name for f in Task._meta.fields] + ["depends_on"]
    list_select_related = ["repository"]

    @admin.display(description="task", ordering="title")
    def task(self, obj):
        title = obj.title if len(obj.title) <= 60 else obj.title[:59] + "…"
        return format_html(
            '<span title="{}">{}</span><br><span class="task-repository">{}</span>', obj.title, title, obj.repository
        )

    @admin.display(description="")
    def inspector_link(self, obj):
        return format_html('<a href="{}">inspect</a>', reverse("inspector:run", args=[obj.pk]))

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        reason = obj.failure_reason or ""
        hint = f"{reason}: {obj.failure_message[:300]}" if reason else obj.get_status_display()
        badge = format_html(
            '<span class="badge badge-{}" title="{}">{}</span>', obj.status, hint, obj.get_status_display()
        )
        if reason and reason != obj.status:
            return format_html('{}<br><span class="badge-reason">{}</span>', badge, obj.get_failure_reason_display())
        return badge

    @admin.display(description="tries", ordering="attempts_count")
    def attempts(self, obj):
        return obj.attempts_count

    @admin.display(description="cost", ordering="cost_usd")
    def cost(self, obj):
        if obj.cost_usd is None:
            return "unknown" if obj.cost_unknown else "—"
        return f"${obj.cost_usd:.4f}" + ("+" if obj.cost_unknown else "")

    @admin.display(description="created", ordering="created_at")
    def created(self, obj):
        return stacked_time(obj.created_at)

    @admin.display(description="finished", ordering="finished_at")
    def finished(self, obj):
        return stacked_time(obj.finished_at)

    @admin.display(description="duration")
    def duration(self, obj):
        """Of the latest attempt: from its start to the end, or to now while it runs."""
        if obj.started_at is None:
            return "—"
        if obj.finished_at is None:
            if obj.status != "running":
                return "—"
            return format_html(
                '<span title="still running">{}…</span>', human_duration(timezone.now() - obj.started_at)
            )
        return human_duration(obj.finished_at - obj.started_at)


@admin.register(TaskEvent)
class TaskEventAdmin(ReadOnlyAdmin):
    list_display = ["task", "seq", "type", "message", "time"]
    list_filter = ["type"]
    search_fields = ["task__id", "message"]
    list_select_related = ["task"]
    readonly_fields = [f.name for f in TaskEvent._meta.fields]

    @admin.display(description="time", ordering="created_at")
    def time(self, obj):
        return with_seconds(obj.created_at)


@admin.register(Attempt)
class AttemptAdmin(ReadOnlyAdmin):
    list_display = ["task", "number", "runner_id", "outcome", "failure_reason", "started", "finished"]
    list_filter = ["outcome", "failure_reason"]
    list_select_related = ["task"]
    readonly_fields = [f.name for f in Attempt._meta.fields]

    @admin.display(description="started", ordering="started_at")
    def started(self, obj):
        return with_seconds(obj.started_at)

    @admin.display(description="finished", ordering="finished_at")
    def finished(self, obj):
        return with_seconds(obj.finished_at)
