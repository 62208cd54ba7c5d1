"""What the runner API takes and gives. Input serializers validate (400 with field and reason);
output serializers describe the replies in the OpenAPI schema."""

from __future__ import annotations

import re

from rest_framework import serializers

from common.procs import strip_credentials
from common.refs import result_branch_problem
from registry.states import FINISH_ACTIONS, FailureReason

NAME_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"
MAX_COUNT = 10**12
# What a shell would read as more than words: separators, pipes, substitutions, redirections, quotes.
FETCH_UNSAFE_RE = re.compile(r"[;&|`$<>(){}\\'\"\n\r\x00-\x1f\x7f]")
NUL_MESSAGE = "NUL characters (\\u0000) are not allowed (PostgreSQL cannot store them)."


def _has_nul(value) -> bool:
    """Whether a JSON value holds a NUL character in any string or key, at any depth."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class JSONDictField(serializers.DictField):
    """A free-form JSON object a runner relays (event data, metrics, test results): what a model
    wrote may hold a NUL, which jsonb refuses; 400 here rather than a DataError (500) at the write."""

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if _has_nul(value):
            raise serializers.ValidationError(NUL_MESSAGE)
        return value


class HostSerializer(serializers.Serializer):
    name = serializers.RegexField(NAME_REGEX, help_text="The host's name: letters, digits, '.', '_', '-'.")
    capacity = serializers.DictField(
        child=serializers.IntegerField(min_value=0, max_value=1000),
        required=False,
        default=dict,
        help_text='Slots this host keeps per repository name: {"<repository name>": n}.',
    )
    version = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")

    def validate_capacity(self, value):
        if len(value) > 1000:
            raise serializers.ValidationError("At most 1000 repositories.")
        if _has_nul(value):
            raise serializers.ValidationError(NUL_MESSAGE)
        if any(len(name) > 100 for name in value):
            raise serializers.ValidationError("Repository names have at most 100 characters.")
        return value


class HostReplySerializer(serializers.Serializer):
    name = serializers.CharField()


class ClaimSerializer(serializers.Serializer):
    runner_id = serializers.CharField(max_length=255)
    task_id = serializers.UUIDField(required=False, allow_null=True, default=None)
    wait = serializers.FloatField(
        required=False, default=0, min_value=0, max_value=30, help_text="Seconds to wait for a runnable task."
    )
    replay_only = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Only a task that replays a recorded transcript (for a runner with no live model): a task "
        "that needs a model stays queued for other runners. Not applied to a task named by `task_id`.",
    )


class ClaimedTaskSerializer(serializers.Serializer):
    """The fields of the runner's ClaimedTask."""

    id = serializers.UUIDField()
    title = serializers.CharField()
    instructions = serializers.CharField()
    repository_id = serializers.IntegerField()
    repository_name = serializers.CharField()
    base_ref = serializers.CharField()
    test_command = serializers.CharField()
    keep_paths = serializers.ListField(child=serializers.CharField())
    push_url = serializers.CharField()
    timeout_seconds = serializers.IntegerField()
    max_iterations = serializers.IntegerField()
    llm_model = serializers.CharField()
    max_steps = serializers.IntegerField(allow_null=True)
    max_tokens = serializers.IntegerField(allow_null=True)
    max_cost_usd = serializers.DecimalField(max_digits=12, decimal_places=6, allow_null=True)
    attempt_id = serializers.IntegerField()
    attempt_number = serializers.IntegerField()
    max_attempts = serializers.IntegerField()
    llm_config = serializers.DictField()
    rerun_final_tests = serializers.BooleanField()
    test_network = serializers.BooleanField()
    lease_token = serializers.CharField()


class ClaimedAttemptSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    number = serializers.IntegerField()
    lease_token = serializers.CharField()


class ClaimReplySerializer(serializers.Serializer):
    task = ClaimedTaskSerializer()
    attempt = ClaimedAttemptSerializer()


def claim_reply(task, attempt) -> dict:
    repo = task.repository
    return {
        "task": ClaimedTaskSerializer(
            {
                "id": task.pk,
                "title": task.title,
                "instructions": task.instructions,
                "repository_id": repo.pk,
                "repository_name": repo.name,
                "base_ref": task.base_ref or repo.default_branch,
                "test_command": task.test_command or repo.test_command,
                "keep_paths": list(repo.keep_paths),
                "push_url": repo.push_url,
                "timeout_seconds": task.timeout_seconds,
                "max_iterations": task.max_iterations,
                "llm_model": task.llm_model,
                "max_steps": task.max_steps,
                "max_tokens": task.max_tokens,
                "max_cost_usd": task.max_cost_usd,
                "attempt_id": attempt.pk,
                "attempt_number": attempt.number,
                "max_attempts": task.max_attempts,
                "llm_config": dict(task.llm_config or {}),
                "rerun_final_tests": repo.rerun_final_tests,
                "test_network": repo.test_network,
                "lease_token": str(attempt.lease_token),
            }  # fmt: skip
        ).data,
        "attempt": {"id": attempt.pk, "number": attempt.number, "lease_token": str(attempt.lease_token)},
    }


class HeartbeatSerializer(serializers.Serializer):
    slot_id = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=1)
    metrics = JSONDictField(required=False, allow_null=True, default=None)


class HeartbeatReplySerializer(serializers.Serializer):
    cancel_requested = serializers.BooleanField()
    attempt_status = serializers.CharField()


# The registry writes these itself when the task's state changes: a runner may not forge them.
REGISTRY_EVENT_TYPES = frozenset({"status", "claimed", "created", "dependencies", "cancel_requested", "attempt_lost"})


class EventSerializer(serializers.Serializer):
    type = serializers.RegexField(r"^[A-Za-z0-9_.:-]{1,64}$", help_text="Event type, e.g. tool_call.")
    message = serializers.CharField(required=False, allow_blank=True, default="", max_length=100_000)
    data = JSONDictField(required=False, default=dict)

    def validate_type(self, value):
        if value in REGISTRY_EVENT_TYPES:
            raise serializers.ValidationError(f"{value!r} events are written by the registry itself.")
        return value


class EventsSerializer(serializers.Serializer):
    events = serializers.ListField(child=EventSerializer(), min_length=1, max_length=500)


class EventsReplySerializer(serializers.Serializer):
    appended = serializers.IntegerField()
    last_seq = serializers.IntegerField()


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField(min_value=0, max_value=MAX_COUNT)
    completion_tokens = serializers.IntegerField(min_value=0, max_value=MAX_COUNT)
    cost_usd = serializers.DecimalField(max_digits=14, decimal_places=6, min_value=0, allow_null=True)


class OkSerializer(serializers.Serializer):
    ok = serializers.BooleanField()


class UploadReplySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    sha256 = serializers.CharField()
    size = serializers.IntegerField()
    name = serializers.CharField()
    kind = serializers.CharField()


class LinkSerializer(serializers.Serializer):
    artifact_id = serializers.UUIDField()
    role = serializers.RegexField(r"^[A-Za-z0-9_.:-]{0,64}$", required=False, allow_blank=True, default="")


class LinkReplySerializer(serializers.Serializer):
    artifact_id = serializers.UUIDField()
    role = serializers.CharField()


class FinishResultSerializer(serializers.Serializer):
    result_branch = serializers.CharField(
        max_length=255, required=False, allow_blank=True, trim_whitespace=False,
        help_text="The task's result branch, agent/<task short id> (optionally with a '-suffix').",
    )  # fmt: skip
    result_commit = serializers.RegexField(r"^[0-9a-f]{0,64}$", required=False, allow_blank=True)
    result_fetch = serializers.CharField(max_length=2000, required=False, allow_blank=True)

    def validate_result_branch(self, value: str) -> str:
        """A ref users fetch and the run page shows: a valid git branch of ours, under agent/ (the
        service checks it is this task's own)."""
        problem = result_branch_problem(value) if value else None
        if problem:
            raise serializers.ValidationError(f"not a result branch: {problem}")
        return value

    def validate_result_fetch(self, value: str) -> str:
        """Users paste this into a shell: a plain ``git fetch <remote> <branch>``, no shell
        syntax, and no credentials (a push_url's userinfo is removed)."""
        if value and (not value.startswith("git fetch ") or FETCH_UNSAFE_RE.search(value)):
            raise serializers.ValidationError("must be a plain 'git fetch <remote> <branch>' (no shell syntax)")
        return strip_credentials(value)

    tests_passed = serializers.BooleanField(required=False, allow_null=True)
    test_results = JSONDictField(required=False)
    summary = serializers.CharField(max_length=1_000_000, required=False, allow_blank=True)


class FinishSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=sorted(str(status) for status in FINISH_ACTIONS))
    failure_reason = serializers.ChoiceField(
        choices=[("", "none"), *FailureReason.choices], required=False, allow_blank=True, default=""
    )
    message = serializers.CharField(required=False, allow_blank=True, default="", max_length=100_000)
    retry = serializers.BooleanField(required=False, default=False)
    result = FinishResultSerializer(required=False, default=dict)
    metrics = JSONDictField(required=False, default=dict)


class FinishReplySerializer(serializers.Serializer):
    status = serializers.CharField()


class ResultsReplySerializer(serializers.Serializer):
    fetch = serializers.CharField(help_text="How to fetch the result: git fetch <results repository> <branch>.")
    commit = serializers.CharField()


COMMIT_REGEX = r"^([0-9a-f]{40}|[0-9a-f]{64})$"


class SlotAllocateSerializer(serializers.Serializer):
    repository_id = serializers.IntegerField(min_value=1)
    holder = serializers.CharField(max_length=255)
    lease_seconds = serializers.IntegerField(min_value=1, required=False, default=3600)
    wait_seconds = serializers.FloatField(min_value=0, max_value=30, required=False, default=0)
    attempt_id = serializers.IntegerField(
        min_value=1, required=False, allow_null=True, default=None,
        help_text="Record the slot on this attempt (then X-Lease-Token is the attempt's lease token).",
    )  # fmt: skip
    host = serializers.CharField(
        max_length=255, required=False, allow_blank=True, default="",
        help_text="Which of this token's hosts (needed only when it registered several).",
    )  # fmt: skip


class SlotGrantSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    index = serializers.IntegerField()
    token = serializers.UUIDField()
    expires_at = serializers.DateTimeField()
    commit = serializers.CharField(allow_blank=True)
    base_commit = serializers.CharField(allow_blank=True)
    setup_hash = serializers.CharField(allow_blank=True)
    fetched_at = serializers.DateTimeField(allow_null=True)
    needs_reset = serializers.BooleanField()
    path = serializers.CharField(help_text="Relative to the host's own pool root.")


class RepoSpecSerializer(serializers.Serializer):
    name = serializers.CharField()
    url = serializers.CharField()
    default_branch = serializers.CharField()
    keep_paths = serializers.ListField(child=serializers.CharField())
    setup_command = serializers.CharField(allow_blank=True)
    setup_watch_files = serializers.ListField(child=serializers.CharField())
    setup_network = serializers.BooleanField()
    setup_timeout = serializers.IntegerField()


class SlotAllocateReplySerializer(serializers.Serializer):
    slot = SlotGrantSerializer()
    repository = RepoSpecSerializer()


def slot_grant_reply(grant) -> dict:
    from dataclasses import asdict

    slot = grant.slot
    return {
        "slot": SlotGrantSerializer(
            {
                "id": slot.pk,
                "index": slot.index,
                "token": slot.lease_token,
                "expires_at": slot.lease_expires_at,
                "commit": slot.commit,
                "base_commit": slot.base_commit,
                "setup_hash": slot.setup_hash,
                "fetched_at": slot.fetched_at,
                "needs_reset": slot.needs_reset,
                "path": slot.path,
            }  # fmt: skip
        ).data,
        "repository": RepoSpecSerializer(asdict(grant.spec)).data,
    }


class SlotPreparedSerializer(serializers.Serializer):
    token = serializers.UUIDField()
    commit = serializers.RegexField(COMMIT_REGEX)
    setup_hash = serializers.RegexField(r"^[0-9a-f]{0,64}$", required=False, allow_blank=True, default="")
    fetched = serializers.BooleanField(required=False, default=False)
    base_commit = serializers.RegexField(
        COMMIT_REGEX, required=False, allow_blank=True, default="", help_text="When the copy was cloned now."
    )


class SlotStateReplySerializer(serializers.Serializer):
    state = serializers.CharField()


class SlotRenewSerializer(serializers.Serializer):
    token = serializers.UUIDField()
    lease_seconds = serializers.IntegerField(min_value=1, required=False, allow_null=True, default=None)


class SlotRenewReplySerializer(serializers.Serializer):
    expires_at = serializers.DateTimeField()


class SlotReleaseSerializer(serializers.Serializer):
    token = serializers.UUIDField()
    commit = serializers.RegexField(r"^([0-9a-f]{40}|[0-9a-f]{64})?$", required=False, allow_blank=True, default="")
    broken_reason = serializers.CharField(max_length=10000, required=False, allow_blank=True, default="")
