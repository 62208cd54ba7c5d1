from __future__ import annotations

from django.conf import settings
from rest_framework import serializers

from repopool.models import Repository, Slot
from repopool.urls_policy import UrlRefused, check_repository_url


def _validate_relative_paths(value):
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise serializers.ValidationError("Give a list of relative paths.")
    for item in value:
        if item.startswith("/") or ".." in item.split("/") or "\x00" in item:
            raise serializers.ValidationError(f"{item!r} must be a relative path inside the repository.")
    return value


def _checked_url(value: str, field: str) -> str:
    """The one URL policy (repopool.urls_policy), reported as this field's validation error."""
    try:
        return check_repository_url(value, field=field)
    except UrlRefused as exc:
        raise serializers.ValidationError(exc.message, code=exc.code) from None


class RepositorySerializer(serializers.ModelSerializer):
    setup_watch_files = serializers.JSONField(required=False, validators=[_validate_relative_paths])
    keep_paths = serializers.JSONField(required=False, validators=[_validate_relative_paths])
    slots = serializers.SerializerMethodField()

    class Meta:
        model = Repository
        fields = [
            "id", "name", "url", "default_branch", "pool_size", "setup_command", "setup_watch_files",
            "test_command", "keep_paths", "push_url", "allow_test_command_override", "setup_network",
            "test_network", "rerun_final_tests", "slots", "warm_requested_at", "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = ["id", "slots", "warm_requested_at", "created_at", "updated_at"]
        # URLs are checked as given: whitespace around one is refused, not silently trimmed.
        extra_kwargs = {
            "default_branch": {"required": False, "allow_blank": True},
            "url": {"trim_whitespace": False},
            "push_url": {"trim_whitespace": False},
        }

    def validate_url(self, value):
        return _checked_url(value, "url")

    def validate_push_url(self, value):
        return _checked_url(value, "push_url") if value else value

    def get_slots(self, repo) -> dict[str, int]:
        return repo.slot_counts()


class RepositoryPublicSerializer(serializers.ModelSerializer):
    """What a user who is not staff sees of a repository: enough to submit a task."""

    class Meta:
        model = Repository
        fields = ["id", "name", "default_branch", "test_command", "allow_test_command_override", "created_at"]
        read_only_fields = fields


class WarmRequestSerializer(serializers.Serializer):
    repository = serializers.CharField()
    warm_requested_at = serializers.DateTimeField()
    slots = serializers.DictField(child=serializers.IntegerField(), help_text="Slots of the pool by state.")


class SlotSerializer(serializers.ModelSerializer):
    repository = serializers.CharField(source="repository.name", read_only=True)

    class Meta:
        model = Slot
        fields = [
            "id", "repository", "repository_id", "index", "host", "path", "state", "state_changed_at",
            "lease_holder", "leased_at", "lease_expires_at", "commit", "last_error", "lease_count",
        ]  # fmt: skip
        read_only_fields = fields


class AllocateSerializer(serializers.Serializer):
    repository = serializers.CharField(help_text="Repository id or name.")
    holder = serializers.CharField(max_length=255)
    lease_seconds = serializers.IntegerField(default=3600, min_value=1)
    wait_seconds = serializers.FloatField(default=0, min_value=0)
    ref = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")

    def validate_lease_seconds(self, value):
        if value > settings.REPO_POOL_MAX_LEASE_SECONDS:
            raise serializers.ValidationError(f"At most {settings.REPO_POOL_MAX_LEASE_SECONDS} seconds.")
        return value

    def validate_wait_seconds(self, value):
        if value > settings.REPO_POOL_MAX_WAIT_SECONDS:
            raise serializers.ValidationError(f"At most {settings.REPO_POOL_MAX_WAIT_SECONDS} seconds.")
        return value


class LeaseSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    path = serializers.CharField()
    lease_token = serializers.UUIDField()
    lease_expires_at = serializers.DateTimeField()
    commit = serializers.CharField()


class TokenSerializer(serializers.Serializer):
    lease_token = serializers.UUIDField()


class RenewSerializer(TokenSerializer):
    lease_seconds = serializers.IntegerField(
        required=False,
        min_value=1,
        help_text="New length from now; by default the length the lease was allocated with.",
    )
    validate_lease_seconds = AllocateSerializer.validate_lease_seconds
