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

from common.errors import DomainError
from common.refs import result_branch_problem
from registry import services as registry
from registry.models import Attempt, AttemptOutcome, Task
from runners.errors import (
    HostLimitReached,
    HostNotRegistered,
    HostTaken,
    LeaseLost,
    NoSlot,
    TokenInvalid,
    TokenRevoked,
    UploadNotFromTask,
)
from runners.models import RunnerHost, RunnerToken, RunnerUpload

TOKEN_PREFIX = "art_r_"
# last_used_at is written at most this often per token (not on every request).
LAST_USED_RESOLUTION = timedelta(seconds=60)
CLAIM_MAX_WAIT = 30.0
CLAIM_POLL_INTERVAL = 0.25
# What a runner's X-Artifact-Metadata may add to an artifact's metadata (beyond the origin attempt).
RUNNER_METADATA_KEYS = ("spooled", "recovered")


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


# --- tokens -------------------------------------------------------------------------------------
def runner_token_create(*, name: str, created_by: Any = None, max_hosts: int | None = None) -> tuple[RunnerToken, str]:
    """A new token named ``name``; returns the row and the token itself, which is never stored
    (only its sha256) and so can be shown this once only. ``max_hosts``: how many host names it
    may register (None: AGENTRUNNER_RUNNER_MAX_HOSTS)."""
    if max_hosts is not None and max_hosts < 1:
        raise DomainError("max_hosts must be at least 1", field="max_hosts")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = RunnerToken.objects.create(
        name=name, token_hash=_hash(raw), prefix=raw[: len(TOKEN_PREFIX) + 6], created_by=created_by,
        max_hosts=max_hosts,
    )  # fmt: skip
    return token, raw


def runner_token_set_max_hosts(*, token_id: int, max_hosts: int | None) -> RunnerToken:
    """Change how many host names the token may register (None: AGENTRUNNER_RUNNER_MAX_HOSTS).
    Lowering it unbinds nothing: hosts already registered keep working; new names are refused."""
    if max_hosts is not None and max_hosts < 1:
        raise DomainError("max_hosts must be at least 1", field="max_hosts")
    RunnerToken.objects.filter(pk=token_id).update(max_hosts=max_hosts)
    return RunnerToken.objects.get(pk=token_id)


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


def runner_token_check_live(*, token: RunnerToken) -> None:
    """TokenRevoked if ``token`` was revoked since the request was authenticated: a long poll
    asks again before each try, so a token revoked while it waits claims or leases nothing."""
    if RunnerToken.objects.filter(pk=token.pk, revoked_at__isnull=False).exists():
        raise TokenRevoked(f"The runner token {token.name!r} was revoked.")


# --- hosts --------------------------------------------------------------------------------------
def host_register(*, token: RunnerToken, name: str, capacity: dict[str, int], version: str) -> RunnerHost:
    """Announce a host (or again, with new capacity). A host name belongs to the first token that
    registered it: another token gets 409 host_taken, so one runner cannot lease another's slots.
    A token registers at most ``host_limit`` names (409 host_limit_reached for one more): a leaked
    token cannot bind every name a fleet will use. The count is taken with the token's row locked,
    so concurrent registrations cannot pass it together."""
    from repopool.bookkeeping import server_host

    if name == server_host():
        raise HostTaken(
            f"host {name!r} is the server's own pool: give this runner host a name of its own (AGENTRUNNER_HOST)"
        )
    now = timezone.now()
    with transaction.atomic():
        locked = RunnerToken.objects.select_for_update().get(pk=token.pk)
        if not RunnerHost.objects.filter(name=name).exists():
            registered = RunnerHost.objects.filter(token=locked).count()
            if registered >= locked.host_limit:
                raise HostLimitReached(
                    f"runner token {locked.name!r} has registered {registered} host(s), its limit of "
                    f"{locked.host_limit}: host {name!r} is refused. Run it under one of the names already "
                    "registered (AGENTRUNNER_HOST; list_runner_tokens shows them), give it a token of its own "
                    "(create_runner_token <name> --max-hosts N), or raise this token's max hosts in the admin "
                    "(default AGENTRUNNER_RUNNER_MAX_HOSTS)"
                )
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
    under gunicorn's sync workers a waiting call occupies a worker for up to ``wait`` seconds.
    (Slot allocation waits in repopool's line instead: ``runner_slot_allocate_wait``.)"""
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
    # Bytes, not str: compare_digest raises TypeError on a non-ASCII str (a latin-1 header).
    given = str(lease_token or "").encode("utf-8", "surrogatepass")
    if not hmac.compare_digest(str(attempt.lease_token).encode(), given):
        raise LeaseLost(f"attempt {attempt_id}: the lease token is not this attempt's")
    if attempt.outcome != AttemptOutcome.RUNNING:
        raise LeaseLost(f"attempt {attempt.number} is {attempt.outcome}, not running")
    return attempt


def attempt_check_lease(*, attempt_id: int, lease_token: str) -> Attempt:
    """Is the attempt running under ``lease_token``? One read, no lock: the early refusal before
    slow I/O such as an upload (the bytes of a lost attempt are not read). Not the fence itself:
    the effect's own transaction fences again (``_fence``) and that answer is the one that counts."""
    attempt = Attempt.objects.filter(pk=attempt_id).first()
    if attempt is None:
        raise LeaseLost(f"attempt {attempt_id} does not exist")
    if not hmac.compare_digest(str(attempt.lease_token), str(lease_token or "")):
        raise LeaseLost(f"attempt {attempt_id}: the lease token is not this attempt's")
    if attempt.outcome != AttemptOutcome.RUNNING:
        raise LeaseLost(f"attempt {attempt.number} is {attempt.outcome}, not running")
    return attempt


def heartbeat_write_every() -> timedelta:
    """How old an attempt's heartbeat_at may get before a heartbeat writes it again: a third of
    the staleness limit (and of the lease), at least a second."""
    limit = min(settings.AGENTRUNNER_LEASE_SECONDS, settings.AGENTRUNNER_ATTEMPT_STALE_SECONDS)
    return timedelta(seconds=max(1.0, limit / 3))


@dataclass(frozen=True)
class HeartbeatReply:
    cancel_requested: bool
    attempt_status: str


def runner_heartbeat(
    *, token: RunnerToken, attempt_id: int, lease_token: str, slot_id: int | None = None, metrics: dict | None = None
) -> HeartbeatReply:
    """The attempt is alive. ``slot_id`` must be a slot of the token's own hosts (404 otherwise, as
    in the slot calls): a runner does not put another host's slot, or a missing one, on its attempt.
    A runner beats once a second (the answer carries a cancel request); the row is written when
    there is news (slot, metrics) or when the last write is older than ``heartbeat_write_every()``,
    as the in-process port does: not a write per second per runner."""
    with transaction.atomic():
        attempt = _fence(attempt_id=attempt_id, lease_token=lease_token)
        if slot_id is not None:
            _token_slot(token, slot_id)
        stale = attempt.heartbeat_at is None or timezone.now() - attempt.heartbeat_at >= heartbeat_write_every()
        if slot_id is not None or metrics or stale:
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


def upload_origin_attempt(*, attempt: Attempt, metadata: dict[str, Any] | None) -> int:
    """The attempt an upload belongs to: the one the runner names in its metadata (a spooled
    artifact re-uploaded by a later attempt keeps the attempt that made it) when that is one of
    this task's attempts; the uploading attempt when none is named. Any other number is refused:
    a runner cannot file an artifact under another task's attempt or one that never was."""
    named = (metadata or {}).get("attempt")
    if named is None:
        return attempt.number
    if isinstance(named, bool) or not isinstance(named, int):
        raise DomainError("attempt must be an integer attempt number.", field="X-Artifact-Metadata")
    if named != attempt.number and not Attempt.objects.filter(task_id=attempt.task_id, number=named).exists():
        raise DomainError(f"attempt {named} is not an attempt of this task.", field="X-Artifact-Metadata")
    return named


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
    metadata: dict[str, Any] | None = None,
    role: str = "",
):
    """Store an artifact for the attempt and, with ``role``, link it to the task in the same
    transaction (one call instead of upload + artifact-links/). The fence is checked before the
    bytes are read (no lock held while they stream) and again in the transaction that records the
    artifact: an attempt lost meanwhile gets 409, no row is created and the bytes stay unreferenced
    (``artifacts_gc``). ``metadata`` (the runner's ``X-Artifact-Metadata``) may name the origin
    attempt of a spooled artifact (see ``upload_origin_attempt``); the server's own keys win."""
    from artifacts import services as artifacts

    attempt = attempt_check_lease(attempt_id=attempt_id, lease_token=lease_token)
    origin = upload_origin_attempt(attempt=attempt, metadata=metadata)

    def record_upload(artifact) -> None:  # runs in the transaction that creates the artifact row
        fenced = _fence(attempt_id=attempt_id, lease_token=lease_token)
        RunnerUpload.objects.get_or_create(
            task_id=fenced.task_id, artifact=artifact, defaults={"attempt": fenced, "token": token}
        )
        if role:
            registry.task_artifact_link(
                task_id=fenced.task_id, artifact_id=artifact.pk, role=role, attempt_number=origin
            )

    extra = {k: v for k, v in (metadata or {}).items() if k in RUNNER_METADATA_KEYS}
    return artifacts.artifact_store(
        source=source,
        name=name,
        kind=kind,
        content_type=content_type,
        metadata={
            **extra,
            "task": str(attempt.task_id),
            "attempt": origin,
            "uploaded_by_attempt": attempt.number,
            "runner_token": token.name,
        },
        expected_sha256=expected_sha256,
        expected_size=expected_size,
        on_stored=record_upload,
    )


def runner_link_artifact(*, attempt_id: int, lease_token: str, artifact_id: uuid.UUID, role: str) -> None:
    """Link an artifact this attempt's task uploaded through the runner API (and only such one),
    under the attempt it was uploaded for (its metadata, checked at upload: a spooled artifact of
    an earlier attempt keeps that attempt)."""
    with transaction.atomic():
        attempt = _fence(attempt_id=attempt_id, lease_token=lease_token)
        upload = RunnerUpload.objects.filter(task_id=attempt.task_id, artifact_id=artifact_id).first()
        if upload is None:
            raise UploadNotFromTask(f"artifact {artifact_id} was not uploaded for this task")
        from artifacts.models import Artifact

        named = (Artifact.objects.filter(pk=artifact_id).values_list("metadata", flat=True).first() or {}).get(
            "attempt"
        )
        number = Attempt.objects.filter(pk=upload.attempt_id).values_list("number", flat=True).get()
        if isinstance(named, int) and not isinstance(named, bool):
            if Attempt.objects.filter(task_id=attempt.task_id, number=named).exists():
                number = named
        registry.task_artifact_link(task_id=attempt.task_id, artifact_id=artifact_id, role=role, attempt_number=number)


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
        branch = result.get("result_branch") or ""
        if branch and (problem := result_branch_problem(branch, attempt.task_id.hex[:8])):
            # Another task's branch, or main, is not this attempt's result to claim.
            raise DomainError(f"result_branch: {problem}", field="result")
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
    if problem := result_branch_problem(branch, task.short_id):
        raise DomainError(f"the result branch {problem}", field="X-Result-Branch")
    if not results.SHA_RE.match(base):
        raise DomainError("the base must be a full commit id (40 or 64 hexadecimal digits)", field="X-Result-Base")
    limit = settings.AGENTRUNNER_RESULTS_BUNDLE_MAX
    if size > limit:
        raise ArtifactTooLarge(f"the bundle of {size} bytes exceeds the limit of {limit} bytes")
    bundle = results.spool_bundle(source, expected_sha256=sha256, expected_size=size, max_size=limit)
    repository = task.repository
    try:
        commit, staging = results.import_bundle(
            repository_name=repository.name, origin_url=repository.url, base_ref=task.base_ref,
            bundle=bundle, branch=branch, base=base,
        )  # fmt: skip
    finally:
        bundle.unlink(missing_ok=True)
    try:
        with transaction.atomic():  # fenced again: an attempt reaped during the import publishes nothing
            _fence(attempt_id=attempt_id, lease_token=lease_token)
            results.publish_branch(repository_name=repository.name, branch=branch, commit=commit)
    finally:
        results.drop_staging(repository_name=repository.name, staging=staging)
    return f"git fetch {results.results_repository(task.repository.name)} {branch}", commit


# --- slots on runner hosts ----------------------------------------------------------------------
# The bookkeeping (rows, leases, fencing tokens) is repopool's; a runner token reaches only the
# slots of the hosts it registered. Another host's slot is as unknown as a missing one (404).
def _token_host(token: RunnerToken, name: str = "") -> RunnerHost:
    hosts = list(RunnerHost.objects.filter(token=token, **({"name": name} if name else {})))
    if len(hosts) == 1:
        return hosts[0]
    if not hosts:
        raise HostNotRegistered(
            f"register host {name!r} first (POST hosts/)" if name else "register this host first (POST hosts/)"
        )
    raise HostNotRegistered("this token registered several hosts: name one in `host`")


def _token_slot(token: RunnerToken, slot_id: int):
    from repopool.errors import SlotNotFound
    from repopool.models import Slot

    hosts = RunnerHost.objects.filter(token=token).values_list("name", flat=True)
    slot = Slot.objects.select_related("repository").filter(pk=slot_id, host__in=list(hosts)).first()
    if slot is None:
        raise SlotNotFound(f"slot {slot_id} does not exist on this runner's hosts")
    return slot


@dataclass(frozen=True)
class SlotGrant:
    slot: Any  # repopool.models.Slot
    spec: Any  # workcopy.slots.RepoSpec


def runner_slot_allocate(
    *,
    token: RunnerToken,
    repository_id: int,
    holder: str,
    lease_seconds: int,
    host: str = "",
    attempt_id: int | None = None,
    lease_token: str = "",
) -> SlotGrant | None:
    """Lease a slot of the token's host for the repository, growing the host's pool up to its
    announced capacity for the repository (else the repository's pool size); None when none is
    free now (the caller waits and asks again, with no transaction held). With ``attempt_id``
    (fenced by the attempt's lease token) the slot is recorded on the attempt."""
    from repopool import services as pool
    from repopool.errors import NoSlotAvailable, RepositoryNotFound
    from repopool.models import Repository

    runner_host = _token_host(token, host)
    repository = Repository.objects.filter(pk=repository_id).first()
    if repository is None:
        raise RepositoryNotFound(f"repository {repository_id} does not exist", field="repository_id")
    capacity = runner_host.capacity.get(repository.name)
    with transaction.atomic():
        if attempt_id is not None:
            _fence(attempt_id=attempt_id, lease_token=lease_token)
        try:
            slot = pool.slot_lease(
                repository=repository, host=runner_host.name, holder=holder, lease_seconds=lease_seconds,
                wait_seconds=0, capacity=capacity or None,
            )  # fmt: skip
        except NoSlotAvailable:
            return None
        if attempt_id is not None:
            registry.attempt_update(attempt_id=attempt_id, slot_id=slot.pk)
    return SlotGrant(slot=slot, spec=pool.repo_spec(repository))


def runner_slot_allocate_wait(
    *, token: RunnerToken, repository_id: int, host: str = "", wait_seconds: float, allocate_once
) -> Any:
    """``allocate_once()`` until it grants a slot or ``wait_seconds`` (at most 30) pass; then
    503 no_slot with Retry-After. Waiting is repopool's line for the host's pool: first come,
    first served, woken by a release (no transaction held while waiting)."""
    from repopool.bookkeeping import wait_in_turn

    grant = wait_in_turn(
        repository_id=repository_id, host=_token_host(token, host).name,
        wait_seconds=min(max(wait_seconds, 0.0), CLAIM_MAX_WAIT), attempt=allocate_once,
    )  # fmt: skip
    if grant is None:
        raise NoSlot(f"no slot of this host became free within {wait_seconds:g}s")
    return grant


def runner_slot_prepared(
    *, token: RunnerToken, slot_id: int, lease_token: uuid.UUID, commit: str, setup_hash: str, fetched: bool,
    base_commit: str = "",
):  # fmt: skip
    from repopool import services as pool

    _token_slot(token, slot_id)
    return pool.slot_prepared(
        slot_id=slot_id, token=lease_token, commit=commit, setup_hash=setup_hash, fetched=fetched,
        base_commit=base_commit,
    )  # fmt: skip


def runner_slot_renew(*, token: RunnerToken, slot_id: int, lease_token: uuid.UUID, lease_seconds: int | None):
    from repopool import services as pool

    _token_slot(token, slot_id)
    return pool.slot_renew(slot_id=slot_id, lease_token=lease_token, lease_seconds=lease_seconds)


def runner_slot_release(
    *, token: RunnerToken, slot_id: int, lease_token: uuid.UUID, commit: str, broken_reason: str = ""
):
    from repopool import services as pool

    _token_slot(token, slot_id)
    return pool.slot_release_remote(slot_id=slot_id, token=lease_token, commit=commit, broken_reason=broken_reason)
