"""The runner's three ports. The pipeline talks only to these interfaces; ``Local*`` call the
services in-process. A runner on another machine gets HTTP implementations of the same ports."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol


class LeaseLost(Exception):
    """This runner no longer holds what it works on (slot lease or attempt): stop, record nothing."""


@dataclass(frozen=True)
class ClaimedTask:
    id: uuid.UUID
    title: str
    instructions: str
    repository_id: int
    repository_name: str
    base_ref: str
    test_command: str
    keep_paths: list[str]
    push_url: str
    timeout_seconds: int
    max_iterations: int
    llm_model: str
    max_steps: int | None
    max_tokens: int | None
    max_cost_usd: Decimal | None
    attempt_id: int
    attempt_number: int
    max_attempts: int
    llm_config: dict = field(default_factory=dict)  # the task's provider (e.g. replay); no secrets
    rerun_final_tests: bool = False  # the repository's suite is flaky: never reuse a passing run
    test_network: bool = False  # may the test commands reach the network (the repository's policy)

    @property
    def short_id(self) -> str:
        return self.id.hex[:8]


@dataclass(frozen=True)
class SlotLease:
    slot_id: int
    path: Path
    token: uuid.UUID
    expires_at: datetime
    commit: str


class RegistryPort(Protocol):
    def claim(self, *, runner_id: str, task_id: uuid.UUID | str | None) -> ClaimedTask | None: ...
    def event(self, *, task_id: uuid.UUID, type: str, message: str = "", data: dict | None = None) -> None: ...
    def heartbeat(self, *, attempt_id: int, slot_id: int | None = None, metrics: dict | None = None) -> None: ...
    def cancel_requested(self, *, task_id: uuid.UUID) -> bool: ...
    def add_usage(
        self, *, task_id: uuid.UUID, prompt_tokens: int, completion_tokens: int, cost_usd: Decimal | None
    ) -> None: ...
    def link_artifact(self, *, task_id: uuid.UUID, artifact_id: uuid.UUID, role: str, attempt_number: int) -> None: ...
    def finish(
        self,
        *,
        task_id: uuid.UUID,
        attempt_id: int,
        status: str,
        failure_reason: str,
        message: str,
        retry: bool,
        result: dict,
        metrics: dict,
    ) -> str: ...


class PoolPort(Protocol):
    def allocate(
        self, *, repository_id: int, holder: str, lease_seconds: int, wait_seconds: float, ref: str
    ) -> SlotLease: ...
    def renew(self, *, slot_id: int, token: uuid.UUID, lease_seconds: int) -> None: ...
    def release(self, *, slot_id: int, token: uuid.UUID) -> None: ...
    def results_remote(self, *, repository_name: str, push_url: str) -> str: ...


class ArtifactsPort(Protocol):
    def store(self, *, path: Path, name: str, kind: str, content_type: str, metadata: dict) -> uuid.UUID: ...


@dataclass
class Timed:
    """Seconds spent in each port, for the attempt's metrics."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, started: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - started


def _drop_broken_connection() -> None:
    """Close this thread's database connection when it no longer works (the server restarted), so
    the next call opens a new one. Outside a request nothing else does: a runner's threads would
    keep failing on the dead connection after the database came back."""
    from django.db import connection

    if connection.connection is None or connection.in_atomic_block:
        return
    try:
        if not connection.is_usable():
            connection.close()
    except Exception:  # closing a dead connection may itself fail; it is gone either way
        connection.connection = None


class _LocalPort:
    """Calls services in-process and adds the time spent to ``timed`` under ``name``."""

    name = ""

    def __init__(self, timed: Timed | None = None):
        self.timed = timed or Timed()

    def _call(self, fn, *, deliver: bool = False, **kwargs) -> Any:
        """Call ``fn``; a database gone away drops the connection (the next call reconnects). With
        ``deliver`` (an outcome that must be recorded: finish, release, an artifact) the call is
        retried with backoff while the database stays unreachable, up to
        AGENTRUNNER_DB_RETRY_SECONDS; every such call is safe to repeat (fenced or idempotent)."""
        from django.conf import settings
        from django.db import InterfaceError, OperationalError

        started = time.monotonic()
        give_up = started + (settings.AGENTRUNNER_DB_RETRY_SECONDS if deliver else 0)
        delay = 0.25
        try:
            while True:
                try:
                    return fn(**kwargs)
                except (OperationalError, InterfaceError):
                    _drop_broken_connection()
                    if time.monotonic() + delay > give_up:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self.timed.add(self.name, started)


class LocalRegistry(_LocalPort):
    name = "registry"

    def claim(self, *, runner_id, task_id):
        from registry import services

        got = self._call(services.task_claim, runner_id=runner_id, task_id=task_id)
        if got is None:
            return None
        task, attempt = got
        repo = task.repository
        return ClaimedTask(
            id=task.pk, title=task.title, instructions=task.instructions, repository_id=repo.pk,
            repository_name=repo.name, base_ref=task.base_ref or repo.default_branch,
            test_command=task.test_command or repo.test_command, keep_paths=list(repo.keep_paths),
            push_url=repo.push_url, timeout_seconds=task.timeout_seconds, max_iterations=task.max_iterations,
            llm_model=task.llm_model, max_steps=task.max_steps, max_tokens=task.max_tokens,
            max_cost_usd=task.max_cost_usd, attempt_id=attempt.pk, attempt_number=attempt.number,
            max_attempts=task.max_attempts, llm_config=dict(task.llm_config or {}),
            rerun_final_tests=repo.rerun_final_tests,
            test_network=repo.test_network,
        )  # fmt: skip

    def event(self, *, task_id, type, message="", data=None):
        from registry import services

        self._call(services.event_append, task_id=task_id, type=type, message=message, data=data)

    def heartbeat(self, *, attempt_id, slot_id=None, metrics=None):
        from registry import services
        from registry.errors import AttemptLost

        try:
            self._call(services.attempt_update, attempt_id=attempt_id, slot_id=slot_id, metrics=metrics)
        except AttemptLost as exc:
            raise LeaseLost(exc.message) from None

    def cancel_requested(self, *, task_id):
        from registry import services

        return self._call(services.task_is_cancel_requested, task_id=task_id)

    def add_usage(self, *, task_id, prompt_tokens, completion_tokens, cost_usd):
        from registry import services

        self._call(
            services.task_add_usage,
            task_id=task_id,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost_usd,
        )

    def link_artifact(self, *, task_id, artifact_id, role, attempt_number):
        from registry import services

        self._call(
            services.task_link_artifact,
            deliver=True,
            task_id=task_id,
            artifact_id=artifact_id,
            role=role,
            attempt_number=attempt_number,
        )

    def finish(self, *, task_id, attempt_id, status, failure_reason, message, retry, result, metrics):
        from registry import services
        from registry.errors import AttemptLost

        try:
            task = self._call(
                services.task_finish, deliver=True, task_id=task_id, attempt_id=attempt_id, status=status,
                failure_reason=failure_reason, message=message, retry=retry, result=result, metrics=metrics,
            )  # fmt: skip
        except AttemptLost as exc:
            raise LeaseLost(exc.message) from None
        return task.status


class LocalPool(_LocalPort):
    name = "pool"

    def allocate(self, *, repository_id, holder, lease_seconds, wait_seconds, ref):
        from repopool import services

        lease = self._call(
            services.slot_allocate, repository=services.repository_get(ref=repository_id), holder=holder,
            lease_seconds=lease_seconds, wait_seconds=wait_seconds, ref=ref,
        )  # fmt: skip
        return SlotLease(lease.slot_id, lease.path, lease.lease_token, lease.lease_expires_at, lease.commit)

    def renew(self, *, slot_id, token, lease_seconds):
        from repopool import services
        from repopool.errors import StaleLease

        try:
            self._call(services.slot_renew, slot_id=slot_id, lease_token=token, lease_seconds=lease_seconds)
        except StaleLease as exc:
            raise LeaseLost(exc.message) from None

    def release(self, *, slot_id, token):
        from repopool import services
        from repopool.errors import StaleLease

        try:
            self._call(services.slot_release, deliver=True, slot_id=slot_id, lease_token=token)
        except StaleLease as exc:
            raise LeaseLost(exc.message) from None

    def results_remote(self, *, repository_name, push_url):
        if push_url:
            return push_url
        from django.conf import settings

        from repopool import git

        path = Path(settings.RESULTS_ROOT) / f"{repository_name}.git"
        git.ensure_bare(path)
        return str(path)


class LocalArtifacts(_LocalPort):
    name = "artifacts"

    def store(self, *, path, name, kind, content_type, metadata):
        from artifacts import services

        artifact = self._call(
            services.artifact_store,
            deliver=True,
            source=path,
            name=name,
            kind=kind,
            content_type=content_type,
            metadata=metadata,
        )
        return artifact.pk


@dataclass
class Ports:
    registry: RegistryPort
    pool: PoolPort
    artifacts: ArtifactsPort
    timed: Timed

    @classmethod
    def local(cls) -> Ports:
        timed = Timed()
        return cls(LocalRegistry(timed), LocalPool(timed), LocalArtifacts(timed), timed)
