"""Every write of the runner API: tokens, hosts, and the attempt-scoped calls with their fence.

Fencing: an attempt-scoped call names the attempt and carries its lease token (new per claim).
``_fence`` locks the task row, then the attempt row (the order of ``task_finish`` and the reaper)
and refuses unless the attempt is still running under that token; the effect then happens in the
same transaction, so a reap or a finish either happened before (409, nothing changed) or waits.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from registry import services as registry
from registry.models import Attempt, AttemptOutcome, Task
from runners.errors import HostTaken, LeaseLost, TokenInvalid, TokenRevoked, UploadNotFromTask
from runners.models import RunnerHost, RunnerToken, RunnerUpload

TOKEN_PREFIX = "art_r_"
# last_used_at is written at most this often per token (not on every request).
LAST_USED_RESOLUTION = timedelta(seconds=60)
CLAIM_MAX_WAIT = 30.0
CLAIM_POLL_INTERVAL = 0.25


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


# --- tokens -------------------------------------------------------------------------------------
def runner_token_create(*, name: str, created_by: Any = None) -> tuple[RunnerToken, str]:
    """A new token named ``name``; returns the row and the token itself, which is never stored
    (only its sha256) and so can be shown this once only."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = RunnerToken.objects.create(
        name=name, token_hash=_hash(raw), prefix=raw[: len(TOKEN_PREFIX) + 6], created_by=created_by
    )
    return token, raw


def runner_token_revoke(*, token_id: int) -> RunnerToken:
    """Revoke at once: the next request with it gets 401 token_revoked. Revoking twice keeps the
    first time."""
    RunnerToken.objects.filter(pk=token_id, revoked_at__isnull=True).update(revoked_at=timezone.now())
    return RunnerToken.objects.get(pk=token_id)


def runner_token_authenticate(*, raw: str) -> RunnerToken:
    token = RunnerToken.objects.filter(token_hash=_hash(raw)).first()
    if token is None:
        raise TokenInvalid("Invalid runner token.")
    if token.revoked_at is not None:
        raise TokenRevoked(f"The runner token {token.name!r} was revoked.")
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        RunnerToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


# --- hosts --------------------------------------------------------------------------------------
def host_register(*, token: RunnerToken, name: str, capacity: dict[str, int], version: str) -> RunnerHost:
    """Announce a host (or again, with new capacity). A host name belongs to the first token that
    registered it: another token gets 409 host_taken, so one runner cannot lease another's slots."""
    now = timezone.now()
    with transaction.atomic():
        host, created = RunnerHost.objects.select_for_update().get_or_create(
            name=name, defaults={"token": token, "capacity": capacity, "version": version, "last_seen_at": now}
        )
        if created:
            return host
        if host.token_id != token.pk:
            raise HostTaken(f"host {name!r} is registered by another runner token")
        host.capacity, host.version, host.last_seen_at = capacity, version, now
        host.save(update_fields=["capacity", "version", "last_seen_at"])
    return host


# --- claim --------------------------------------------------------------------------------------
def runner_claim_wait(*, claim_once, wait: float) -> Any:
    """Call ``claim_once()`` (one short transaction each) until it returns something or ``wait``
    seconds (capped at CLAIM_MAX_WAIT) have passed. No transaction is held while sleeping. Note:
    under gunicorn's sync workers a waiting claim occupies a worker for up to ``wait`` seconds."""
    deadline = time.monotonic() + min(max(wait, 0.0), CLAIM_MAX_WAIT)
    while True:
        got = claim_once()
        remaining = deadline - time.monotonic()
        if got is not None or remaining <= 0:
            return got
        time.sleep(min(CLAIM_POLL_INTERVAL, remaining))


# --- attempt-scoped calls -----------------------------------------------------------------------
def _fence(*, attempt_id: int, lease_token: str) -> Attempt:
    """The attempt, with its task row and its own row locked until the transaction ends (call
    inside ``transaction.atomic``). LeaseLost unless it is running under ``lease_token``."""
    task_id = Attempt.objects.filter(pk=attempt_id).values_list("task_id", flat=True).first()
    if task_id is None:
        raise LeaseLost(f"attempt {attempt_id} does not exist")
    Task.objects.select_for_update().filter(pk=task_id).values_list("pk", flat=True).get()
    attempt = Attempt.objects.select_for_update().get(pk=attempt_id)
    if not hmac.compare_digest(str(attempt.lease_token), str(lease_token or "")):
        raise LeaseLost(f"attempt {attempt_id}: the lease token is not this attempt's")
    if attempt.outcome != AttemptOutcome.RUNNING:
        raise LeaseLost(f"attempt {attempt.number} is {attempt.outcome}, not running")
    return attempt


def attempt_check_lease(*, attempt_id: int, lease_token: str) -> Attempt:
    """The fence alone, in a short transaction of its own (before slow I/O such as an upload)."""
    with transaction.atomic():
        return _fence(attempt_id=attempt_id, lease_token=lease_token)


@dataclass(frozen=True)
class HeartbeatReply:
    cancel_requested: bool
    attempt_status: str


def runner_heartbeat(
    *, attempt_id: int, lease_token: str, slot_id: int | None = None, metrics: dict | None = None
) -> HeartbeatReply:
    with transaction.atomic():
        attempt = _fence(attempt_id=attempt_id, lease_token=lease_token)
        registry.attempt_update(attempt_id=attempt.pk, slot_id=slot_id, metrics=metrics)
        cancel = Task.objects.filter(pk=attempt.task_id).values_list("cancel_requested", flat=True).get()
    return HeartbeatReply(cancel_requested=cancel, attempt_status=AttemptOutcome.RUNNING)


def runner_events(*, attempt_id: int, lease_token: str, events: list[dict[str, Any]]) -> list[int]:
    """Append the events in order; returns their sequence numbers."""
    with transaction.atomic():
        attempt = _fence(attempt_id=attempt_id, lease_token=lease_token)
        return registry.event_append_batch(task_id=attempt.task_id, events=events)


def runner_add_usage(
    *, attempt_id: int, lease_token: str, prompt_tokens: int, completion_tokens: int, cost_usd: Decimal | None
) -> None:
    with transaction.atomic():
        attempt = _fence(attempt_id=attempt_id, lease_token=lease_token)
        registry.task_add_usage(
            task_id=attempt.task_id, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_usd=cost_usd
        )


def runner_upload(
    *,
    token: RunnerToken,
    attempt_id: int,
    lease_token: str,
    source: Iterable[bytes],
    name: str,
    kind: str,
    content_type: str,
    expected_sha256: str,
    expected_size: int | None,
):
    """Store an artifact for the attempt. The fence is checked before the bytes are read (no lock
    held while they stream) and again in the transaction that records the artifact: an attempt
    lost meanwhile gets 409, no row is created and the bytes stay unreferenced (``artifacts_gc``)."""
    from artifacts import services as artifacts

    attempt = attempt_check_lease(attempt_id=attempt_id, lease_token=lease_token)

    def record_upload(artifact) -> None:  # runs in the transaction that creates the artifact row
        fenced = _fence(attempt_id=attempt_id, lease_token=lease_token)
        RunnerUpload.objects.get_or_create(
            task_id=fenced.task_id, artifact=artifact, defaults={"attempt": fenced, "token": token}
        )

    return artifacts.artifact_store(
        source=source,
        name=name,
        kind=kind,
        content_type=content_type,
        metadata={"task": str(attempt.task_id), "attempt": attempt.number, "runner_token": token.name},
        expected_sha256=expected_sha256,
        expected_size=expected_size,
        on_stored=record_upload,
    )


def runner_link_artifact(*, attempt_id: int, lease_token: str, artifact_id: uuid.UUID, role: str) -> None:
    """Link an artifact this attempt's task uploaded through the runner API (and only such one)."""
    with transaction.atomic():
        attempt = _fence(attempt_id=attempt_id, lease_token=lease_token)
        upload = RunnerUpload.objects.filter(task_id=attempt.task_id, artifact_id=artifact_id).first()
        if upload is None:
            raise UploadNotFromTask(f"artifact {artifact_id} was not uploaded for this task")
        registry.task_artifact_link(
            task_id=attempt.task_id,
            artifact_id=artifact_id,
            role=role,
            attempt_number=Attempt.objects.filter(pk=upload.attempt_id).values_list("number", flat=True).get(),
        )


def runner_finish(
    *,
    attempt_id: int,
    lease_token: str,
    status: str,
    failure_reason: str,
    message: str,
    retry: bool,
    result: dict,
    metrics: dict,
) -> Task:
    with transaction.atomic():
        attempt = _fence(attempt_id=attempt_id, lease_token=lease_token)
        return registry.task_finish(
            task_id=attempt.task_id,
            attempt_id=attempt.pk,
            status=status,
            failure_reason=failure_reason,
            message=message,
            retry=retry,
            result=result,
            metrics=metrics,
        )


def runner_results(
    *,
    attempt_id: int,
    lease_token: str,
    source: Iterable[bytes],
    size: int,
    sha256: str,
    branch: str,
    base: str,
) -> tuple[str, str]:
    """Fetch the attempt's result branch from an uploaded git bundle into the server's results
    repository; returns (fetch hint, commit). The branch must be the task's own (``agent/<id>``,
    optionally with a ``-suffix``): a runner cannot overwrite another task's result."""
    from artifacts.errors import ArtifactTooLarge
    from common.errors import DomainError
    from runners import results

    attempt = attempt_check_lease(attempt_id=attempt_id, lease_token=lease_token)
    task = Task.objects.select_related("repository").get(pk=attempt.task_id)
    own = f"agent/{task.short_id}"
    if branch != own and not (branch.startswith(f"{own}-") and results.BRANCH_SUFFIX_RE.match(branch[len(own) :])):
        raise DomainError(f"the result branch must be {own!r} (this task's)", field="X-Result-Branch")
    if not results.SHA_RE.match(base):
        raise DomainError("the base must be a full commit id (40 or 64 hexadecimal digits)", field="X-Result-Base")
    limit = settings.AGENTRUNNER_RESULTS_BUNDLE_MAX
    if size > limit:
        raise ArtifactTooLarge(f"the bundle of {size} bytes exceeds the limit of {limit} bytes")
    bundle = results.spool_bundle(source, expected_sha256=sha256, expected_size=size, max_size=limit)
    try:
        repository = task.repository
        commit = results.import_bundle(
            repository_name=repository.name, origin_url=repository.url, base_ref=task.base_ref,
            bundle=bundle, branch=branch, base=base,
        )  # fmt: skip
    finally:
        bundle.unlink(missing_ok=True)
    return f"git fetch {results.results_repository(task.repository.name)} {branch}", commit
