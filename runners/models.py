"""Runner hosts and what lets them in: scoped runner tokens (stored hashed), the hosts they
registered, and the idempotency records that make a retried request harmless."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models


class RunnerToken(models.Model):
    """A runner host's credential: allowed the /api/runner/v1/ endpoints only. The token itself is
    shown once when created; only its sha256 is kept (a database leak gives no usable token)."""

    name = models.CharField(max_length=100, unique=True)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=16, editable=False, help_text="The token's first characters, to recognise it.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    max_hosts = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="How many host names this token may register; empty: AGENTRUNNER_RUNNER_MAX_HOSTS.",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…{', revoked' if self.revoked_at else ''})"

    @property
    def host_limit(self) -> int:
        return self.max_hosts or settings.AGENTRUNNER_RUNNER_MAX_HOSTS

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class RunnerHost(models.Model):
    """A machine that runs tasks. Its name is bound to the first token that registered it."""

    name = models.CharField(max_length=255, unique=True)
    token = models.ForeignKey(RunnerToken, on_delete=models.CASCADE, related_name="hosts")
    capacity = models.JSONField(default=dict, blank=True, help_text='Slots per repository: {"<name>": n}.')
    version = models.CharField(max_length=100, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class IdempotencyRecord(models.Model):
    """The answer given to one (token, Idempotency-Key): a retry of the same request gets it again
    instead of repeating the effect. Kept 24 hours (see runners.idempotency)."""

    token = models.ForeignKey(RunnerToken, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=128)
    request_hash = models.CharField(max_length=64)
    status_code = models.PositiveSmallIntegerField()
    body = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["token", "key"], name="idempotency_unique_key")]

    def __str__(self) -> str:
        return f"{self.key} -> {self.status_code}"


class RunnerUpload(models.Model):
    """An artifact a runner uploaded for an attempt: only these may be linked to that attempt's
    task through the runner API (a runner cannot attach another task's or a user's artifact)."""

    token = models.ForeignKey(RunnerToken, null=True, on_delete=models.SET_NULL, related_name="+")
    attempt = models.ForeignKey("registry.Attempt", on_delete=models.CASCADE, related_name="+")
    task = models.ForeignKey("registry.Task", on_delete=models.CASCADE, related_name="+")
    artifact = models.ForeignKey("artifacts.Artifact", on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["task", "artifact"], name="runner_upload_unique")]
