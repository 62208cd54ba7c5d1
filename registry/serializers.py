from __future__ import annotations

import datetime

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from common.drf import SharedFields
from common.errors import PermissionDenied
from common.permissions import is_staff
from common.rows import RowQuery, bigint_or_none
from registry.models import Attempt, Task, TaskArtifact, TaskEvent
from registry.selectors import tasks_visible_to
from registry.states import FailureReason
from repopool.models import Repository

# Every task creation looks its repository up: compiled once (see common.rows).
_REPOSITORY_BY_ID = RowQuery(Repository, 'm."id" = %s')
_REPOSITORY_BY_NAME = RowQuery(Repository, 'm."name" = %s')


@extend_schema_field(OpenApiTypes.STR)
class RepositoryRefField(serializers.Field):
    """A repository given by id or by name."""

    default_error_messages = {"unknown": "Unknown repository {value!r}.", "invalid": "Give a repository id or name."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, str)) or data == "":
            self.fail("invalid")
        if isinstance(data, str) and "\x00" in data:
            self.fail("invalid")
        repo = None
        # Not "²" nor "١٢"; nor more digits than an id has (int() refuses past 4,300: a 500).
        if isinstance(data, int) or (data.isascii() and data.isdigit() and len(data) <= 20):
            pk = bigint_or_none(int(data))
            repo = None if pk is None else _REPOSITORY_BY_ID.get(pk)
        if repo is None and isinstance(data, str):
            repo = _REPOSITORY_BY_NAME.get(data)
        if repo is None:
            self.fail("unknown", value=data)
        return repo

    def to_representation(self, value):
        return value.name


class TaskCreateSerializer(SharedFields, serializers.Serializer):
    title = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    instructions = serializers.CharField(max_length=200_000)
    repository = RepositoryRefField(help_text="Repository id or name.")
    base_ref = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    test_command = serializers.CharField(max_length=10_000, required=False, allow_blank=True, default="")
    priority = serializers.IntegerField(required=False, default=0, min_value=-1_000_000, max_value=1_000_000)
    max_attempts = serializers.IntegerField(required=False, default=3, min_value=1, max_value=100)
    timeout_seconds = serializers.IntegerField(required=False, default=1800, min_value=1, max_value=7 * 24 * 3600)
    max_iterations = serializers.IntegerField(required=False, default=3, min_value=1, max_value=50)
    llm_model = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    max_steps = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=1, max_value=10_000)
    max_tokens = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=1, max_value=1_000_000_000
    )
    max_cost_usd = serializers.DecimalField(
        max_digits=12, decimal_places=6, required=False, allow_null=True, default=None, min_value=0
    )
    depends_on = serializers.ListField(child=serializers.UUIDField(), required=False, default=list, max_length=1000)

    def validate_instructions(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("Instructions may not be empty.")
        return value

    def validate_depends_on(self, value):
        if not value:
            return []
        ids = set(value)
        # Another user's task is as unknown as a task that does not exist.
        tasks = list(tasks_visible_to(self.context["request"].user).filter(pk__in=ids))
        missing = ids - {task.pk for task in tasks}
        if missing:
            raise serializers.ValidationError(f"Unknown task(s): {', '.join(sorted(map(str, missing)))}.")
        return tasks

    def validate(self, attrs):
        user = self.context["request"].user
        if attrs.get("test_command") and not is_staff(user) and not attrs["repository"].allow_test_command_override:
            raise PermissionDenied(
                f"Repository {attrs['repository'].name!r} does not accept a test_command from users who are not "
                "staff: leave it out to run the repository's own test command.",
                field="test_command",
            )
        if not attrs.get("title"):
            first_line = attrs["instructions"].strip().splitlines()[0]
            attrs["title"] = first_line[:200]
        return attrs


class TaskDependenciesSerializer(serializers.Serializer):
    depends_on = serializers.ListField(child=serializers.UUIDField(), max_length=1000)
    validate_depends_on = TaskCreateSerializer.validate_depends_on


class TaskSerializer(serializers.ModelSerializer):
    repository = serializers.CharField(source="repository.name", read_only=True)
    failure_reason = serializers.ChoiceField(
        choices=FailureReason.choices, allow_blank=True, read_only=True, help_text="Empty unless the task failed."
    )
    repository_id = serializers.IntegerField(read_only=True)
    depends_on = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    total_tokens = serializers.IntegerField(read_only=True)
    owner = serializers.SlugRelatedField(
        slug_field="username", read_only=True, help_text="Who submitted it; empty for operators' commands."
    )

    class Meta:
        model = Task
        fields = [
            "id", "title", "instructions", "owner", "repository", "repository_id", "base_ref", "test_command",
            "priority", "max_attempts", "timeout_seconds", "max_iterations", "llm_model", "max_steps",
            "max_tokens", "max_cost_usd", "depends_on", "status", "failure_reason", "failure_message",
            "cancel_requested", "attempts_count", "result_branch", "result_commit", "result_fetch",
            "tests_passed", "test_results", "summary", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd",
            "cost_unknown", "created_at", "updated_at", "queued_at", "started_at", "finished_at",
        ]  # fmt: skip
        read_only_fields = fields

    def to_representation(self, task: Task) -> dict:
        """The same JSON as the declared fields give (a test holds them equal), built directly:
        DRF's field-by-field walk cost most of a list page's time. Reads ``dependency_ids`` when
        the view attached them (``attach_dependency_ids``), else the task's dependencies."""
        dt, cost = _datetime_json_of(self), _COST.to_representation
        repository_name = getattr(task, "repository_name", None)
        if repository_name is None:
            repository_name = task.repository.name
        owner_name = task.owner_username if hasattr(task, "owner_username") else (task.owner and task.owner.username)
        dependency_ids = getattr(task, "dependency_ids", None)
        if dependency_ids is None:
            dependency_ids = [dependency.pk for dependency in task.depends_on.all()]
        return {
            "id": str(task.id),
            "title": task.title,
            "instructions": task.instructions,
            "owner": owner_name,
            "repository": repository_name,
            "repository_id": task.repository_id,
            "base_ref": task.base_ref,
            "test_command": task.test_command,
            "priority": task.priority,
            "max_attempts": task.max_attempts,
            "timeout_seconds": task.timeout_seconds,
            "max_iterations": task.max_iterations,
            "llm_model": task.llm_model,
            "max_steps": task.max_steps,
            "max_tokens": task.max_tokens,
            "max_cost_usd": None if task.max_cost_usd is None else _MAX_COST.to_representation(task.max_cost_usd),
            "depends_on": dependency_ids,
            "status": task.status,
            "failure_reason": task.failure_reason,
            "failure_message": task.failure_message,
            "cancel_requested": task.cancel_requested,
            "attempts_count": task.attempts_count,
            "result_branch": task.result_branch,
            "result_commit": task.result_commit,
            "result_fetch": task.result_fetch,
            "tests_passed": task.tests_passed,
            "test_results": task.test_results,
            "summary": task.summary,
            "prompt_tokens": task.prompt_tokens,
            "completion_tokens": task.completion_tokens,
            "total_tokens": task.total_tokens,
            "cost_usd": None if task.cost_usd is None else cost(task.cost_usd),
            "cost_unknown": task.cost_unknown,
            "created_at": dt(task.created_at),
            "updated_at": dt(task.updated_at),
            "queued_at": dt(task.queued_at),
            "started_at": dt(task.started_at),
            "finished_at": dt(task.finished_at),
        }


# The declared fields' own formatting, for the direct representations above and below.
_DATETIME = serializers.DateTimeField()
_COST = serializers.DecimalField(max_digits=14, decimal_places=6)
_MAX_COST = serializers.DecimalField(max_digits=12, decimal_places=6)


def _datetime_json():
    """DRF's DateTimeField.to_representation, or, while the active time zone is UTC (the
    setting), a function giving the same strings without looking the zone up again for every
    value (five a task, 250 a list page: a tenth of the page's time)."""
    if timezone.get_current_timezone_name() != "UTC":
        return _DATETIME.to_representation
    return _utc_iso


def _datetime_json_of(serializer) -> object:
    """``_datetime_json()`` looked up once per serializer: a list's items share one child."""
    try:
        return serializer._datetime_json
    except AttributeError:
        serializer._datetime_json = _datetime_json()
        return serializer._datetime_json


def _utc_iso(value: datetime.datetime | None) -> str | None:
    if not value:
        return None
    if value.tzinfo is None:  # naive: DRF makes it aware in the active zone
        return _DATETIME.to_representation(value)
    if value.utcoffset():
        value = value.astimezone(datetime.UTC)
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def attach_dependency_ids(tasks: list[Task]) -> None:
    """Each task's ``dependency_ids`` (newest dependency first, as ``depends_on`` orders them) from
    one query on the dependency table: no Task instances built for them."""
    through = Task.depends_on.through
    found: dict = {}
    rows = (
        through.objects.filter(from_task_id__in=[task.pk for task in tasks])
        .order_by("-to_task__created_at")
        .values_list("from_task_id", "to_task_id")
    )
    for source, target in rows:
        found.setdefault(source, []).append(target)
    for task in tasks:
        task.dependency_ids = found.get(task.pk, [])


class AttemptSerializer(serializers.ModelSerializer):
    class Meta:
        model = Attempt
        fields = [
            "id", "number", "runner_id", "slot", "started_at", "heartbeat_at", "finished_at", "outcome",
            "failure_reason", "message", "metrics",
        ]  # fmt: skip
        read_only_fields = fields


class TaskEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = TaskEvent
        fields = ["seq", "type", "message", "data", "created_at"]
        read_only_fields = fields

    def to_representation(self, event: TaskEvent) -> dict:
        """The declared fields' JSON, built directly (see TaskSerializer.to_representation)."""
        return {
            "seq": event.seq,
            "type": event.type,
            "message": event.message,
            "data": event.data,
            "created_at": _datetime_json_of(self)(event.created_at),
        }


class TaskArtifactSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="artifact.id", read_only=True)
    name = serializers.CharField(source="artifact.name", read_only=True)
    kind = serializers.CharField(source="artifact.kind", read_only=True)
    size = serializers.IntegerField(source="artifact.size", read_only=True)
    sha256 = serializers.CharField(source="artifact.sha256", read_only=True)
    content_type = serializers.CharField(source="artifact.content_type", read_only=True)
    content_url = serializers.SerializerMethodField()

    class Meta:
        model = TaskArtifact
        fields = [
            "id",
            "role",
            "attempt_number",
            "name",
            "kind",
            "size",
            "sha256",
            "content_type",
            "content_url",
            "created_at",
        ]
        read_only_fields = fields

    def get_content_url(self, link) -> str:
        return f"/api/artifacts/{link.artifact_id}/content/"
