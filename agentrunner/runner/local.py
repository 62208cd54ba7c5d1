"""The in-process adapter of the runner's ports: each call is a service call in this process (which
holds the database). The one module of ``agentrunner.runner`` allowed to import the apps (see the
import-linter contract in pyproject.toml)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agentrunner.runner.ports import ClaimedTask, Heartbeat, Ports, SlotLease, Timed

CLAIM_POLL_SECONDS = 0.2  # how often a claim with ``wait`` looks again


class _LocalPort:
    """Calls services in-process and adds the time spent to ``timed`` under ``name``."""

    name = ""

    def __init__(self, timed: Timed | None = None):
        self.timed = timed or Timed()

    def _call(self, fn, **kwargs) -> Any:
        started = time.monotonic()
        try:
            return fn(**kwargs)
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

    def __init__(self, timed: Timed | None = None):
        super().__init__(timed)
        self._beats: dict[int, float] = {}  # attempt id -> when its row was last written

    def claim(self, *, runner_id, task_id, wait=0):
        from registry import services

        deadline = time.monotonic() + max(0.0, wait)
        while True:
            got = self._call(services.task_claim, runner_id=runner_id, task_id=task_id)
            if got is not None:
                return claimed_task(*got)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(CLAIM_POLL_SECONDS, left))

    def events(self, *, task, events):
        from registry import services

        for event in events:
            self._call(
                services.event_append,
                task_id=task.id,
                type=event["type"],
                message=event.get("message", ""),
                data=event.get("data"),
            )

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

        self._call(services.task_link_artifact, task_id=task.id, artifact_id=artifact_id, role=role)

    def finish(self, *, task, status, failure_reason, message, retry, result, metrics):
        from registry import services

        finished = self._call(
            services.task_finish, task_id=task.id, attempt_id=task.attempt_id, status=status,
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
        from repopool import services

        self._call(services.slot_release, slot_id=slot_id, lease_token=token)

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
        return f"git fetch {remote} {branch}"


class LocalArtifacts(_LocalPort):
    name = "artifacts"

    def store(self, *, task, path, name, kind, content_type, metadata, role=""):
        from artifacts import services
        from registry import services as registry

        artifact = self._call(
            services.artifact_store, source=path, name=name, kind=kind, content_type=content_type, metadata=metadata
        )
        if role:  # linked under the attempt its metadata names (task_link_artifact checks it is the task's)
            self._call(registry.task_link_artifact, task_id=task.id, artifact_id=artifact.pk, role=role)
        return artifact.pk


def _close_connection() -> None:
    from django.db import connection

    connection.close()


def local_ports() -> Ports:
    timed = Timed()
    return Ports(LocalRegistry(timed), LocalPool(timed), LocalArtifacts(timed), timed, _close_connection)
