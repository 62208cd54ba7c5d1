from __future__ import annotations

import uuid

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from repopool.urls_policy import UrlRefused, check_repository_url

REPOSITORY_NAME_VALIDATOR = RegexValidator(
    r"^(?!\.{1,2}$)[A-Za-z0-9._-]{1,100}$",
    "Use 1-100 letters, digits, '-', '_' or '.' (the name becomes a folder name).",
)


class Repository(models.Model):
    name = models.CharField(max_length=100, unique=True, validators=[REPOSITORY_NAME_VALIDATOR])
    url = models.CharField(max_length=1000, help_text="A local path or any git URL.")
    default_branch = models.CharField(max_length=255, default="main")
    pool_size = models.PositiveIntegerField(default=2, validators=[MinValueValidator(1), MaxValueValidator(64)])
    setup_command = models.TextField(blank=True, default="")
    setup_watch_files = models.JSONField(default=list, blank=True)
    test_command = models.TextField(default="python -m pytest -q")
    keep_paths = models.JSONField(default=list, blank=True)
    push_url = models.CharField(
        max_length=1000,
        blank=True,
        default="",
        help_text="Where result branches are pushed; empty: the bare results repository Agent Runner keeps.",
    )
    allow_test_command_override = models.BooleanField(
        default=False, help_text="Accept a task's own test_command from users who are not staff."
    )
    setup_network = models.BooleanField(default=True, help_text="The setup command may reach the network.")
    test_network = models.BooleanField(default=False, help_text="Test commands may reach the network.")
    rerun_final_tests = models.BooleanField(
        default=False,
        help_text="Always run the suite again as the final check, even when the agent's last run passed on the "
        "same tree (for suites known to be flaky).",
    )
    # Set by a warm request (API, admin); a runner host or a Celery worker clears it and warms.
    # Warming runs the setup command, which never runs inside a web request.
    warm_requested_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "repositories"

    def __str__(self) -> str:
        return self.name

    def slot_counts(self) -> dict[str, int]:
        """Slots of every host by state (uses a prefetched ``slots`` when there is one)."""
        counts: dict[str, int] = {}
        for slot in self.slots.all():
            counts[slot.state] = counts.get(slot.state, 0) + 1
        return counts

    def clean(self) -> None:
        """The URL policy for every path that validates a row, the admin's form included."""
        errors = {}
        for field in ("url", "push_url"):
            value = getattr(self, field)
            if field == "push_url" and not value:
                continue
            try:
                setattr(self, field, check_repository_url(value, field=field))
            except UrlRefused as exc:
                errors[field] = [exc.message]
        if errors:
            raise ValidationError(errors)


class SlotState(models.TextChoices):
    CLONING = "cloning"
    FREE = "free"
    LEASED = "leased"
    RESETTING = "resetting"
    BROKEN = "broken"


class Slot(models.Model):
    repository = models.ForeignKey(Repository, on_delete=models.CASCADE, related_name="slots")
    index = models.PositiveIntegerField()
    host = models.CharField(max_length=255)
    path = models.CharField(max_length=2000)
    state = models.CharField(max_length=16, choices=SlotState.choices, default=SlotState.CLONING)
    state_changed_at = models.DateTimeField(auto_now_add=True)
    lease_holder = models.CharField(max_length=255, blank=True, default="")
    lease_token = models.UUIDField(null=True, blank=True)
    leased_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    lease_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Length of the latest lease as allocated; a renew without a length extends by this much.",
    )
    commit = models.CharField(max_length=64, blank=True, default="")
    base_commit = models.CharField(
        max_length=64, blank=True, default="", help_text="Commit of the default branch a reset returns to."
    )
    setup_hash = models.CharField(max_length=64, blank=True, default="")
    fetched_at = models.DateTimeField(null=True, blank=True, help_text="Last fetch from origin.")
    needs_reset = models.BooleanField(
        default=False,
        help_text="Its lease expired on a remote host: that host resets the copy before the next use.",
    )
    last_error = models.TextField(blank=True, default="")
    lease_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["repository_id", "host", "index"]
        constraints = [
            models.UniqueConstraint(fields=["repository", "host", "index"], name="slot_unique_index_per_host"),
        ]
        indexes = [
            models.Index(fields=["repository", "host", "state"]),
            models.Index(fields=["state", "lease_expires_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.repository.name}#{self.index}@{self.host}"

    @staticmethod
    def new_token() -> uuid.UUID:
        return uuid.uuid4()
