from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models

from registry.states import FailureReason, TaskStatus


class Task(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    title = models.CharField(max_length=200)
    instructions = models.TextField()
    repository = models.ForeignKey("repopool.Repository", on_delete=models.PROTECT, related_name="tasks")
    # Who submitted the task: plain users see, cancel and retry only their own; null for tasks made
    # by operators' commands (runagent --repo, demo), which only staff see through the API.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="agent_tasks"
    )
    base_ref = models.CharField(max_length=255, blank=True, default="")
    test_command = models.TextField(blank=True, default="", help_text="Overrides the repository's test command.")
    priority = models.IntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=3, validators=[MinValueValidator(1)])
    timeout_seconds = models.PositiveIntegerField(default=1800, validators=[MinValueValidator(1)])
    max_iterations = models.PositiveIntegerField(
        default=3, validators=[MinValueValidator(1)], help_text="Agent rounds: test failures go back to the agent."
    )
    llm_model = models.CharField(max_length=200, blank=True, default="")
    # The LLM provider this task must run with whoever runs it (e.g. the demo's replay), set only by
    # operators' commands, never through the API; no secrets: {"provider": ..., "replay_file": ...}.
    llm_config = models.JSONField(default=dict, blank=True)
    max_steps = models.PositiveIntegerField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    max_cost_usd = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)

    depends_on = models.ManyToManyField("self", symmetrical=False, related_name="dependents", blank=True)

    status = models.CharField(max_length=16, choices=TaskStatus.choices, default=TaskStatus.PENDING, db_index=True)
    failure_reason = models.CharField(max_length=32, choices=FailureReason.choices, blank=True, default="")
    failure_message = models.TextField(blank=True, default="")
    cancel_requested = models.BooleanField(default=False)
    attempts_count = models.PositiveIntegerField(default=0)

    result_branch = models.CharField(max_length=255, blank=True, default="")
    result_commit = models.CharField(max_length=64, blank=True, default="")
    result_fetch = models.CharField(max_length=2000, blank=True, default="", help_text="How to fetch the result.")
    tests_passed = models.BooleanField(null=True, blank=True)
    # The final test run as data: passed/failed/errored/skipped counts and the failing tests, when
    # the suite wrote JUnit XML or printed a summary line we recognise; empty otherwise.
    test_results = models.JSONField(default=dict, blank=True)
    summary = models.TextField(blank=True, default="")

    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True)
    cost_unknown = models.BooleanField(default=False)

    # Last event sequence number handed out; bumped under the row lock (see services.event_append).
    event_seq = models.PositiveBigIntegerField(default=0)

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "-priority", "created_at"], name="task_claim_order")]

    def __str__(self) -> str:
        return f"{self.title} ({self.status})"

    @property
    def short_id(self) -> str:
        return self.id.hex[:8]

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class AttemptOutcome(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRY = "retry"
    LOST = "lost"


class Attempt(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    runner_id = models.CharField(max_length=255)
    slot = models.ForeignKey("repopool.Slot", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    started_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices, default=AttemptOutcome.RUNNING)
    failure_reason = models.CharField(max_length=32, blank=True, default="")
    message = models.TextField(blank=True, default="")
    metrics = models.JSONField(default=dict, blank=True)
    # The fencing token of this attempt, new for every claim: a remote runner sends it with every
    # attempt-scoped call, and a call without the current one changes nothing (409 lease_lost).
    lease_token = models.UUIDField(default=uuid.uuid4, editable=False)

    class Meta:
        ordering = ["task", "number"]
        constraints = [models.UniqueConstraint(fields=["task", "number"], name="attempt_unique_number")]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.task_id}"


class TaskEvent(models.Model):
    """Append-only: created by services.event_append, never edited or deleted through the API."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveBigIntegerField()
    type = models.CharField(max_length=64)
    message = models.TextField(blank=True, default="")
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["task", "seq"]
        constraints = [models.UniqueConstraint(fields=["task", "seq"], name="event_unique_seq")]

    def __str__(self) -> str:
        return f"#{self.seq} {self.type}"


class TaskArtifact(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="artifact_links")
    artifact = models.ForeignKey("artifacts.Artifact", on_delete=models.CASCADE, related_name="task_links")
    role = models.CharField(max_length=64, blank=True, default="")
    attempt_number = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["task", "created_at"]
        constraints = [models.UniqueConstraint(fields=["task", "artifact", "role"], name="task_artifact_unique")]
