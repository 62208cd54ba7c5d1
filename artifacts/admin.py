from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from artifacts import services
from artifacts.models import Artifact

TEXT_KINDS = {"patch", "log", "test_report", "transcript"}


@admin.register(Artifact)
class ArtifactAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "human_size", "short_sha", "tasks", "created_at", "download"]
    list_filter = ["kind", "content_type"]
    search_fields = ["name", "sha256", "task_links__task__id"]
    readonly_fields = [
        "id",
        "name",
        "kind",
        "content_type",
        "size",
        "sha256",
        "storage_key",
        "metadata",
        "created_at",
        "download",
        "preview",
    ]
    fields = readonly_fields

    def has_add_permission(self, request):
        return False  # uploads go through the API, which verifies and streams

    def has_change_permission(self, request, obj=None):
        return request.method in ("GET", "HEAD")

    @admin.display(description="size", ordering="size")
    def human_size(self, obj):
        return filesizeformat(obj.size)

    @admin.display(description="sha256")
    def short_sha(self, obj):
        return obj.sha256[:12]

    @admin.display(description="tasks")
    def tasks(self, obj):
        links = obj.task_links.all()[:5]
        return format_html_join(
            ", ",
            '<a href="{}">{}</a>',
            ((reverse("admin:registry_task_change", args=[link.task_id]), str(link.task_id)[:8]) for link in links),
        )

    @admin.display(description="download")
    def download(self, obj):
        return format_html('<a href="{}">download</a>', f"/admin/artifacts/artifact/{obj.pk}/download/")

    @admin.display(description="content")
    def preview(self, obj):
        if obj.kind not in TEXT_KINDS and not obj.content_type.startswith("text/"):
            return "binary content: use the download link"
        if obj.size > settings.ARTIFACTS_INLINE_PREVIEW_MAX:
            return f"{filesizeformat(obj.size)}: too large to show here, use the download link"
        with services.artifact_open(artifact=obj) as handle:
            text = handle.read().decode("utf-8", errors="replace")
        if obj.kind == "patch":
            colors = {"+": "#e6ffec", "-": "#ffebe9", "@": "#ddf4ff"}
            rows = (
                (colors.get(line[:1], "transparent") if not line.startswith(("+++", "---")) else "#f6f8fa", line)
                for line in text.splitlines()
            )
            body = format_html_join("", '<div style="background:{}">{}</div>', rows)
            return format_html('<pre class="diff" style="font-family:monospace;white-space:pre-wrap">{}</pre>', body)
        return format_html('<pre style="white-space:pre-wrap">{}</pre>', text)

    def get_urls(self):
        from django.urls import path

        return [
            path(
                "<uuid:artifact_id>/download/",
                self.admin_site.admin_view(self.download_view),
                name="artifacts_artifact_download",
            )
        ] + super().get_urls()

    def download_view(self, request, artifact_id):
        from artifacts.api import content_response

        return content_response(request, services.artifact_get(artifact_id=artifact_id))
