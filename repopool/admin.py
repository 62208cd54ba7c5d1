from __future__ import annotations

import inspect

from django import forms
from django.contrib import admin, messages
from django.utils import timezone
from django.utils.formats import date_format

from common.errors import DomainError
from repopool import services
from repopool.models import Repository, Slot


def _each(modeladmin, request, queryset, act) -> None:
    """Run ``act`` (a service call) per row; a refusal is a warning on the page, not a 500."""
    for obj in queryset:
        try:
            act(obj)
        except DomainError as exc:
            modeladmin.message_user(request, f"{obj}: {exc.message}", messages.WARNING)


@admin.action(description="Warm the pool of selected repositories")
def warm_repositories(modeladmin, request, queryset):
    # Warming runs the setup command: it is queued for a worker, never run in this request.
    def warm(repo):
        services.pool_warm_request(repository=repo)
        modeladmin.message_user(
            request,
            f"{repo.name}: warm requested; a worker (or `manage.py warm_pool --pending`) does it",
            messages.INFO,
        )

    _each(modeladmin, request, queryset, warm)


class RepositoryForm(forms.ModelForm):
    class Meta:
        model = Repository
        fields = "__all__"  # noqa: DJ007 - the admin shows every setting, including ones added later

    def clean_url(self):
        url = self.cleaned_data["url"]
        if self.instance.pk is None or url != self.instance.url:
            # The same check the service makes, here so a bad URL is a form error and not a 500.
            try:
                services._remote_default_branch(url)
            except DomainError as exc:
                raise forms.ValidationError(exc.message) from None
        return url


@admin.register(Repository)
class RepositoryAdmin(admin.ModelAdmin):
    form = RepositoryForm
    readonly_fields = ["warm_requested_at", "created_at", "updated_at"]
    list_display = ["name", "url", "default_branch", "pool_size", "test_command"]
    search_fields = ["name", "url"]
    actions = [warm_repositories]

    def has_delete_permission(self, request, obj=None):
        return False  # tasks keep their repository, and slots on disk need retiring first

    def save_model(self, request, obj, form, change):
        """Writes go through the services, like the API's."""
        data = {name: form.cleaned_data[name] for name in form.changed_data if name in form.cleaned_data}
        if change:
            services.repository_update(repository=Repository.objects.get(pk=obj.pk), **data)
        else:
            data = {name: form.cleaned_data[name] for name in form.cleaned_data}
            accepted = inspect.signature(services.repository_create).parameters
            created = services.repository_create(**{k: v for k, v in data.items() if k in accepted})
            rest = {k: v for k, v in data.items() if k not in accepted}
            if rest:
                services.repository_update(repository=created, **rest)
            obj.pk = created.pk
        obj.refresh_from_db()


@admin.action(description="Force-release (reset and free) selected slots")
def force_release(modeladmin, request, queryset):
    def release(slot):
        slot = services.slot_force_release(slot_id=slot.pk)
        modeladmin.message_user(request, f"{slot}: {slot.state}")

    _each(modeladmin, request, queryset, release)


@admin.action(description="Mark selected slots broken")
def mark_broken(modeladmin, request, queryset):
    _each(modeladmin, request, queryset, lambda slot: services.slot_mark_broken(slot_id=slot.pk))
    modeladmin.message_user(request, f"Marked {queryset.count()} slot(s) broken.")


@admin.register(Slot)
class SlotAdmin(admin.ModelAdmin):
    """Inspect-only: a slot changes state through its actions (services), never by a form."""

    list_display = ["__str__", "state", "lease_holder", "lease_expires", "commit", "lease_count", "last_error"]
    list_filter = ["state", "repository", "host"]
    search_fields = ["lease_holder", "path"]
    actions = [force_release, mark_broken]
    readonly_fields = [f.name for f in Slot._meta.fields]
    list_select_related = ["repository"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # a deleted row would leave its working copy on disk

    @admin.display(description="lease expires", ordering="lease_expires_at")
    def lease_expires(self, obj):
        if not obj.lease_expires_at:
            return "—"
        return date_format(timezone.localtime(obj.lease_expires_at), "Y-m-d H:i:s")
