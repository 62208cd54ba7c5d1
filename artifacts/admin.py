from __future__ import annotations

import re
from collections.abc import Iterator

from django.conf import settings
from django.contrib import admin
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from artifacts import services
from artifacts.models import Artifact

TEXT_KINDS = {"patch", "log", "test_report", "transcript"}

HUNK_RE = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")
FILE_HEADER = ("diff --git ", "index ", "--- ", "+++ ", "new file mode", "deleted file mode", "old mode", "new mode",
               "similarity index", "rename from", "rename to", "copy from", "copy to", "Binary files")  # fmt: skip
ADDED, REMOVED, HUNK, HEADER, PLAIN = "#e6ffec", "#ffebe9", "#ddf4ff", "#f6f8fa", "transparent"


def patch_line_colors(text: str) -> Iterator[tuple[str, str]]:
    """(background, line) for a diff or a git format-patch mail. A line is an addition or a
    removal only inside a hunk, counted by its header: the mail's ``-- `` signature, a commit
    message's ``- item`` or a removed line that starts with ``--`` are each what they are."""
    old_left = new_left = 0
    for line in text.splitlines():
        if old_left > 0 or new_left > 0:
            tag = line[:1]
            if tag == "-" and old_left > 0:
                old_left -= 1
                yield REMOVED, line
                continue
            if tag == "+" and new_left > 0:
                new_left -= 1
                yield ADDED, line
                continue
            if tag == " " or line == "":  # context (some tools strip the space of an empty one)
                old_left, new_left = old_left - 1, new_left - 1
                yield PLAIN, line
                continue
            if tag == "\\":  # "\ No newline at end of file"
                yield PLAIN, line
                continue
            old_left = new_left = 0  # a truncated hunk: read the line as outside one
        hunk = HUNK_RE.match(line)
        if hunk:
            old_left = int(hunk.group(1) or 1)
            new_left = int(hunk.group(2) or 1)
            yield HUNK, line
        elif line.startswith(FILE_HEADER):
            yield HEADER, line
        else:
            yield PLAIN, line


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
        "linked_tasks",
        "download",
        "preview",
    ]
    fields = readonly_fields

    def has_add_permission(self, request):
        return False  # uploads go through the API, which verifies and streams

    def has_change_permission(self, request, obj=None):
        return False  # content-addressed and immutable: the page is view-only

    def has_delete_permission(self, request, obj=None):
        # Staff delete through the API (DELETE /api/artifacts/{id}/), whose service removes the
        # blob with the record; the admin's delete removed the record only.
        return False

    @admin.display(description="tasks")
    def linked_tasks(self, obj):
        links = obj.task_links.select_related("task").order_by("created_at")
        rows = [
            (
                reverse("admin:registry_task_change", args=[link.task_id]),
                link.task.title,
                link.role or "artifact",
                f", attempt {link.attempt_number}" if link.attempt_number else "",
            )
            for link in links
        ]
        if not rows:
            return "not linked to a task"
        return format_html_join(mark_safe("<br>"), '<a href="{}">{}</a> ({}{})', rows)

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
            body = format_html_join("", '<div style="min-height:1.2em;background:{}">{}</div>', patch_line_colors(text))
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
