"""The in-process adapter of the runner's ports: each call is a service call in this process (which
holds the database). The one module of ``agentrunner.runner`` allowed to import the apps (see the
import-linter contract in pyproject.toml)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from agentrunner.runner.ports import ClaimedTask, Heartbeat, Ports, SlotLease, Timed
from common.outcomes import ServiceUnavailable
from common.procs import strip_credentials

CLAIM_POLL_SECONDS = 0.2  # how often a claim with ``wait`` looks again


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
        """Call ``fn``. A database gone away drops the connection (the next call reconnects) and
        raises ServiceUnavailable, as the HTTP adapter does for a server it cannot reach. With
        ``deliver`` (what must be recorded: an attempt's end, a slot's release, an artifact) the
        call is retried with backoff while the database stays away, up to
        AGENTRUNNER_DB_RETRY_SECONDS; each such call is safe to repeat (fenced or idempotent)."""
        from django.conf import settings
        from django.db import InterfaceError, OperationalError

        started = time.monotonic()
        give_up = started + (settings.AGENTRUNNER_DB_RETRY_SECONDS if deliver else 0)
        delay = 0.25
        try:
            while True:
                try:
                    return fn(**kwargs)
                except (OperationalError, InterfaceError) as exc:
                    _drop_broken_connection()
                    if time.monotonic() + delay > give_up:
                        # The class name only: the message can name the database's host and user.
                        raise ServiceUnavailable(f"database unavailable ({type(exc).__name__})") from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self.timed.add(self.name, started)


def claimed_task(task, attempt) -> ClaimedTask:
    """What a runner learns of a task it claimed (the runner API sends the same fields)."""
    repo = task.repository
    return ClaimedTask(
        id=task.pk, title=task.title, instructions=task.instructions, repository_id=repo.pk,
        repository_name=repo.name, base_ref=task.base_ref or repo.default_branch,
        test_command=task.test_command or repo.test_command, keep_paths=list(repo.keep_paths),
        push_url=repo.push_url, timeout_seconds=task.timeout_seconds, max_iterations=task.max_iterations,
        llm_model=task.llm_model, max_steps=task.max_steps, max_tokens=task.max_tokens,
        max_cost_usd=task.max_cost_usd, attempt_id=attempt.pk, attempt_number=attempt.number,
        max_attempts=task.max_attempts, llm_config=dict(task.llm_config or {}),
        rerun_final_tests=repo.rerun_final_tests, test_network=repo.test_network,
        lease_token=str(getattr(attempt, "lease_token", "") or ""),
    )  # fmt: skip


class LocalRegistry(_LocalPort):
    name = "registry"
    events_block = True  # each write waits on the database: the heartbeat thread writes a run's events

    def __init__(self, timed: Timed | None = None):
        super().__init__(timed)
        self._beats: dict[int, float] = {}  # attempt id -> when its row was last written

    def claim(self, *, runner_id, task_id, wait=0, replay_only=False):
        from registry import services

        deadline = time.monotonic() + max(0.0, wait)
        while True:
            got = self._call(services.task_claim, runner_id=runner_id, task_id=task_id, replay_only=replay_only)
            if got is not None:
                return claimed_task(*got)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(CLAIM_POLL_SECONDS, left))

    def events(self, *, task, events):
        from registry import services

        if len(events) == 1:
            event = events[0]
            self._call(
                services.event_append,
                task_id=task.id,
                type=event["type"],
                message=event.get("message", ""),
                data=event.get("data"),
            )
            return
        for start in range(0, len(events), services.EVENT_BATCH_MAX):  # one statement a batch
            batch = events[start : start + services.EVENT_BATCH_MAX]
            rows = [{"type": e["type"], "message": e.get("message", ""), "data": e.get("data") or {}} for e in batch]
            self._call(services.event_append_batch, task_id=task.id, events=rows)

    def heartbeat(self, *, task, slot_id=None, metrics=None):
        from django.conf import settings

        from registry import services

        # The runner calls this once a second for the cancel answer; the attempt's row is written
        # when there is news (slot, metrics) or at a third of its staleness limit, as often as a
        # lease renew: not a write per second per runner.
        every = max(1.0, min(settings.AGENTRUNNER_LEASE_SECONDS, settings.AGENTRUNNER_ATTEMPT_STALE_SECONDS) / 3)
        now = time.monotonic()
        if slot_id is not None or metrics or now - self._beats.get(task.attempt_id, float("-inf")) >= every:
            # AttemptLost is a LeaseLost: the runner stops.
            self._call(services.attempt_update, attempt_id=task.attempt_id, slot_id=slot_id, metrics=metrics)
            self._beats[task.attempt_id] = now
        return Heartbeat(cancel_requested=self._call(services.task_is_cancel_requested, task_id=task.id))

    def add_usage(self, *, task, prompt_tokens, completion_tokens, cost_usd):
        from registry import services

        self._call(
            services.task_add_usage,
            task_id=task.id,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost_usd,
        )

    def link_artifact(self, *, task, artifact_id, role):
        from registry import services

        self._call(services.task_link_artifact, deliver=True, task_id=task.id, artifact_id=artifact_id, role=role)

    def finish(self, *, task, status, failure_reason, message, retry, result, metrics):
        from registry import services

        finished = self._call(
            services.task_finish, deliver=True, task_id=task.id, attempt_id=task.attempt_id, status=status,
            failure_reason=failure_reason, message=message, retry=retry, result=result, metrics=metrics,
        )  # fmt: skip
        return finished.status

    def flush(self):
        return None


class LocalPool(_LocalPort):
    name = "pool"

    def allocate(self, *, task, holder, lease_seconds, wait_seconds, ref):
        from repopool import services

        lease = self._call(
            services.slot_allocate, repository=services.repository_get(ref=task.repository_id), holder=holder,
            lease_seconds=lease_seconds, wait_seconds=wait_seconds, ref=ref,
        )  # fmt: skip
        return SlotLease(lease.slot_id, lease.path, lease.lease_token, lease.lease_expires_at, lease.commit)

    def renew(self, *, slot_id, token, lease_seconds):
        from repopool import services

        # StaleLease is a LeaseLost.
        self._call(services.slot_renew, slot_id=slot_id, lease_token=token, lease_seconds=lease_seconds)

    def release(self, *, slot_id, token):
        self.release_start(slot_id=slot_id, token=token)()

    def release_start(self, *, slot_id, token):
        """The slot goes to ``resetting`` now (fenced by the token), its copy is reset by a thread
        of its own (git only, no database), and the returned function waits for that reset and
        frees the slot (or marks it broken)."""
        from repopool import services

        reset = self._call(services.slot_release_start, deliver=True, slot_id=slot_id, lease_token=token)
        broken: list[str] = []

        def work() -> None:
            started = time.monotonic()
            try:
                broken.append(services.slot_copy_reset(reset))
            finally:
                self.timed.add(self.name, started)

        thread = threading.Thread(target=work, name=f"reset-slot-{slot_id}", daemon=True)
        thread.start()

        def wait() -> None:
            thread.join()
            # No answer from the thread (it died): the copy's state is unknown, so it is broken.
            reason = broken[0] if broken else "reset failed: the reset did not finish"
            self._call(services.slot_release_done, deliver=True, reset=reset, broken_reason=reason)

        return wait

    def publish(self, *, task, path, branch, base):
        from django.conf import settings

        from workcopy import git

        started = time.monotonic()
        try:
            if task.push_url:
                remote = task.push_url
                git.push(path, remote, branch)
            else:
                results = Path(settings.RESULTS_ROOT) / f"{task.repository_name}.git"
                git.ensure_bare(results)
                remote = str(results)
                # Our own results repository also keeps the base, so the next push sends only new commits.
                git.push(path, remote, branch, base=base)
        finally:
            self.timed.add(self.name, started)
        return f"git fetch {strip_credentials(remote)} {branch}"  # the hint is shown: no token in it


class LocalArtifacts(_LocalPort):
    name = "artifacts"

    def store(self, *, task, path, name, kind, content_type, metadata, role=""):
        from artifacts import services
        from registry import services as registry

        on_stored = None
        if role:
            # Linked in the transaction that records the artifact (both or neither), under the
            # attempt its metadata names: task_link_artifact looks that attempt up, unless it is
            # this one, which exists (an artifact spooled by an earlier attempt is looked up).
            named = metadata.get("attempt")
            attempt_number = task.attempt_number if type(named) is int and named == task.attempt_number else None

            def on_stored(artifact) -> None:
                registry.task_link_artifact(
                    task_id=task.id, artifact_id=artifact.pk, role=role, attempt_number=attempt_number
                )

        artifact = self._call(
            services.artifact_store,
            deliver=True,
            source=path,
            name=name,
            kind=kind,
            content_type=content_type,
            metadata=metadata,
            on_stored=on_stored,
        )
        return artifact.pk


def _close_connection() -> None:
    from django.db import connection

    try:
        connection.close()
    except Exception:  # a connection the database dropped: gone either way
        connection.connection = None


def local_ports() -> Ports:
    timed = Timed()
    return Ports(LocalRegistry(timed), LocalPool(timed), LocalArtifacts(timed), timed, _close_connection)
