from __future__ import annotations

from django.contrib import admin, messages
from django.utils.html import format_html

from common.errors import DomainError
from registry import services
from registry.models import Attempt, Task, TaskArtifact, TaskEvent


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
    fields = ["seq", "created_at", "type", "message", "data"]
    readonly_fields = fields
    ordering = ["seq"]


class AttemptInline(ReadOnlyInline):
    model = Attempt
    fields = [
        "number",
        "runner_id",
        "slot",
        "started_at",
        "finished_at",
        "outcome",
        "failure_reason",
        "message",
        "metrics",
    ]
    readonly_fields = fields


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
class TaskAdmin(admin.ModelAdmin):
    list_display = [
        "title",
        "repository",
        "status",
        "failure_reason",
        "priority",
        "attempts_count",
        "total_tokens",
        "cost_usd",
        "created_at",
        "finished_at",
    ]
    list_filter = ["status", "repository", "failure_reason"]
    search_fields = ["id", "title", "instructions", "result_branch", "result_commit"]
    actions = [cancel_tasks, retry_tasks]
    inlines = [AttemptInline, TaskArtifactInline, TaskEventInline]
    readonly_fields = [f.name for f in Task._meta.fields] + ["depends_on"]
    list_select_related = ["repository"]

    def has_add_permission(self, request):
        return False  # tasks are created through the API or runagent, which go through services

    def has_change_permission(self, request, obj=None):
        return request.method in ("GET", "HEAD")  # inspect only; changes go through the actions


@admin.register(TaskEvent)
class TaskEventAdmin(admin.ModelAdmin):
    list_display = ["task", "seq", "type", "message", "created_at"]
    list_filter = ["type"]
    search_fields = ["task__id", "message"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return request.method in ("GET", "HEAD")

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Attempt)
class AttemptAdmin(admin.ModelAdmin):
    list_display = ["task", "number", "runner_id", "outcome", "failure_reason", "started_at", "finished_at"]
    list_filter = ["outcome", "failure_reason"]
    readonly_fields = [f.name for f in Attempt._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return request.method in ("GET", "HEAD")
