"""The runner's three ports: the only way the pipeline reaches the registry, the pool and the
artifact store. Two adapters implement them: ``local`` (``agentrunner/runner/local.py``, the
services in-process) and ``http`` (``agentrunner/runner/http.py``, the runner API).

Every call an attempt makes passes its ``ClaimedTask``: the adapter finds there what fences the
call (attempt id and lease token). What a port raises comes from ``common.outcomes`` (``LeaseLost``,
``NoSlotAvailable``, ``SlotBroken``, ``RefNotFound``, ``GitError``, ``ServiceUnavailable``), the same
classes from either adapter.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from common.outcomes import LeaseLost

__all__ = [
    "ArtifactsPort", "ClaimedTask", "Heartbeat", "LeaseLost", "PoolPort", "Ports", "RegistryPort", "SlotLease", "Timed",
]  # fmt: skip


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
    lease_token: str = ""  # the attempt's fencing token: every attempt-scoped call presents it

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


@dataclass(frozen=True)
class Heartbeat:
    cancel_requested: bool


class RegistryPort(Protocol):
    # True when ``events`` waits for the store (in-process: the database); the runner then hands
    # them to a thread of its own. Over HTTP an outbox takes them at once.
    events_block: bool

    def claim(
        self, *, runner_id: str, task_id: uuid.UUID | str | None, wait: float = 0, replay_only: bool = False
    ) -> ClaimedTask | None:
        """Claim the task named (or the next runnable one), waiting up to ``wait`` seconds for one;
        ``replay_only``: the next one that replays a recorded transcript (a runner with no live model)."""

    def events(self, *, task: ClaimedTask, events: list[dict]) -> None:
        """Append events in order; each ``{"type", "message", "data"}``."""

    def heartbeat(self, *, task: ClaimedTask, slot_id: int | None = None, metrics: dict | None = None) -> Heartbeat:
        """The attempt is alive (with its slot, metrics); says whether a cancel was requested.
        Raises LeaseLost when the attempt is no longer this runner's."""

    def add_usage(
        self, *, task: ClaimedTask, prompt_tokens: int, completion_tokens: int, cost_usd: Decimal | None
    ) -> None: ...

    def link_artifact(self, *, task: ClaimedTask, artifact_id: uuid.UUID, role: str) -> None:
        """Link a stored artifact to the task (to the attempt its metadata names, else this one)."""

    def finish(
        self, *, task: ClaimedTask, status: str, failure_reason: str, message: str, retry: bool, result: dict,
        metrics: dict,
    ) -> str:  # fmt: skip
        """End the attempt; returns the task's status. Raises LeaseLost when fenced out."""

    def flush(self) -> None:
        """Deliver whatever is buffered (HTTP); nothing to do in-process."""


class PoolPort(Protocol):
    def allocate(
        self, *, task: ClaimedTask, holder: str, lease_seconds: int, wait_seconds: float, ref: str
    ) -> SlotLease:
        """A prepared working copy on this host, checked out detached at ``ref``. Raises
        NoSlotAvailable, SlotBroken, RefNotFound or GitError."""

    def renew(self, *, slot_id: int, token: uuid.UUID, lease_seconds: int) -> None:
        """Extend the lease; LeaseLost when the token is stale."""

    def release(self, *, slot_id: int, token: uuid.UUID) -> None:
        """Reset the copy here and free the slot; LeaseLost when the token is stale."""

    def release_start(self, *, slot_id: int, token: uuid.UUID) -> Callable[[], None]:
        """``release`` in two steps: the copy's reset starts in the background (LeaseLost now when
        the token is stale) and the returned function waits for it and frees the slot."""

    def publish(self, *, task: ClaimedTask, path: Path, branch: str, base: str) -> str:
        """Make the result commit of ``path`` (HEAD) reachable off this host, as ``branch``: pushed
        to ``task.push_url``, else to the server's results repository. Returns the fetch hint
        (``git fetch <remote> <branch>``)."""


class ArtifactsPort(Protocol):
    def store(
        self, *, task: ClaimedTask, path: Path, name: str, kind: str, content_type: str, metadata: dict, role: str = ""
    ) -> uuid.UUID:
        ...
        # with ``role``: also linked to the task under it, in the same step (over HTTP: one call);
        # the attempt is the one ``metadata["attempt"]`` names (a spooled artifact keeps its origin)


@dataclass
class Timed:
    """Seconds spent in each port, for the attempt's metrics."""

    seconds: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, started: float) -> None:  # from several threads (heartbeat, uploads)
        elapsed = time.monotonic() - started
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed


def _nothing() -> None:
    return None


@dataclass
class Ports:
    registry: RegistryPort
    pool: PoolPort
    artifacts: ArtifactsPort
    timed: Timed
    # Called by a thread of the runner that used the ports, as it ends (in-process: close its
    # database connection).
    thread_done: Callable[[], None] = _nothing

    @classmethod
    def local(cls) -> Ports:
        """The services in-process (this process holds the database)."""
        from agentrunner.runner.local import local_ports

        return local_ports()

    @classmethod
    def from_settings(cls) -> Ports:
        """The ports this host is configured for: HTTP (``agentrunner.runner.http``) when
        ``AGENTRUNNER_API_URL`` (or the per-service URLs) and ``AGENTRUNNER_RUNNER_TOKEN`` are set,
        else the services in-process."""
        from agentrunner.runner.http import ports_from_settings

        return ports_from_settings() or cls.local()
