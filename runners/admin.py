"""Runner tokens are created by ``manage.py create_runner_token <name>`` (shown once, on the
operator's terminal); the admin lists them and revokes them, and never shows the hash."""

from __future__ import annotations

from django.contrib import admin, messages

from runners import services
from runners.models import RunnerHost, RunnerToken


@admin.action(description="Revoke the selected runner tokens")
def revoke_tokens(modeladmin, request, queryset):
    for token in queryset:
        services.runner_token_revoke(token_id=token.pk)
    modeladmin.message_user(request, f"revoked {queryset.count()} runner token(s)", messages.INFO)


@admin.register(RunnerToken)
class RunnerTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "created_by", "created_at", "last_used_at", "revoked_at", "max_hosts"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix"]
    # Only the host limit may change here (empty: AGENTRUNNER_RUNNER_MAX_HOSTS); the rest is history.
    fields = ["name", "prefix", "created_by", "created_at", "last_used_at", "revoked_at", "max_hosts"]
    readonly_fields = ["name", "prefix", "created_by", "created_at", "last_used_at", "revoked_at"]
    actions = [revoke_tokens]

    def has_add_permission(self, request) -> bool:
        return False  # `manage.py create_runner_token <name>`: the token is printed once, never stored

    def save_model(self, request, obj, form, change) -> None:
        services.runner_token_set_max_hosts(token_id=obj.pk, max_hosts=obj.max_hosts)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # revoke instead: the hosts and records it made stay attributable


@admin.register(RunnerHost)
class RunnerHostAdmin(admin.ModelAdmin):
    list_display = ["name", "token", "version", "capacity", "last_seen_at", "created_at"]
    search_fields = ["name"]
    readonly_fields = ["name", "token", "version", "capacity", "last_seen_at", "created_at"]

    def has_add_permission(self, request) -> bool:
        return False  # hosts register themselves (POST /api/runner/v1/hosts/)
