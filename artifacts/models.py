from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class ArtifactKind(models.TextChoices):
    PATCH = "patch"
    LOG = "log"
    TEST_REPORT = "test_report"
    TRANSCRIPT = "transcript"
    FILE = "file"
    OTHER = "other"


class Artifact(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255)
    kind = models.CharField(max_length=16, choices=ArtifactKind.choices, default=ArtifactKind.OTHER)
    content_type = models.CharField(max_length=255, default="application/octet-stream")
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64, db_index=True)
    storage_key = models.CharField(max_length=500)
    metadata = models.JSONField(default=dict, blank=True)
    # Who uploaded it: plain users see their own uploads and the artifacts of their own tasks.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="agent_artifacts"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}, {self.size} B)"
