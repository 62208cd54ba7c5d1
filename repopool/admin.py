from __future__ import annotations

from django.contrib import admin, messages

from repopool import services
from repopool.models import Repository, Slot


@admin.action(description="Warm the pool of selected repositories")
def warm_repositories(modeladmin, request, queryset):
    # Warming runs the setup command: it is queued for a worker, never run in this request.
    for repo in queryset:
        services.pool_warm_request(repository=repo)
        modeladmin.message_user(
            request,
            f"{repo.name}: warm requested; a worker (or `manage.py warm_pool --pending`) does it",
            messages.INFO,
        )


@admin.register(Repository)
class RepositoryAdmin(admin.ModelAdmin):
    list_display = ["name", "url", "default_branch", "pool_size", "test_command"]
    search_fields = ["name", "url"]
    actions = [warm_repositories]


@admin.action(description="Force-release (reset and free) selected slots")
def force_release(modeladmin, request, queryset):
    for slot in queryset:
        slot = services.slot_force_release(slot_id=slot.pk)
        modeladmin.message_user(request, f"{slot}: {slot.state}")


@admin.action(description="Mark selected slots broken")
def mark_broken(modeladmin, request, queryset):
    for slot in queryset:
        services.slot_mark_broken(slot_id=slot.pk)
    modeladmin.message_user(request, f"Marked {queryset.count()} slot(s) broken.")


@admin.register(Slot)
class SlotAdmin(admin.ModelAdmin):
    list_display = ["__str__", "state", "lease_holder", "lease_expires_at", "commit", "lease_count", "last_error"]
    list_filter = ["state", "repository", "host"]
    search_fields = ["lease_holder", "path"]
    actions = [force_release, mark_broken]
    readonly_fields = [f.name for f in Slot._meta.fields]

    def has_add_permission(self, request):
        return False
