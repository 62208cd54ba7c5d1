"""Celery tasks: thin wrappers over the runner pipeline and the reaper."""

from __future__ import annotations

import logging

from celery import shared_task

from common.errors import DomainError

log = logging.getLogger(__name__)


@shared_task(name="agentrunner.run_agent_task", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_agent_task(task_id: str) -> str:
    """Run one task. A redelivered message for a task that is no longer queued does nothing:
    the attempt count in the database, not the broker, bounds how often a task runs."""
    from agentrunner.runner.pipeline import run_task

    try:
        summary = run_task(task_id=task_id)
    except DomainError as exc:  # not queued any more (claimed elsewhere, cancelled, finished)
        log.info("task %s not run: %s", task_id, exc.message)
        return "skipped"
    return summary.status if summary else "skipped"


@shared_task(name="agentrunner.reap", ignore_result=True)
def reap() -> dict:
    from agentrunner.reaping import reap as do_reap

    report = do_reap()
    return {"slots": report.slots, "attempts": report.attempts}


@shared_task(name="agentrunner.requeue_stale", ignore_result=True)
def requeue_stale() -> int:
    from django.conf import settings

    from registry.services import tasks_requeue_stale

    return len(tasks_requeue_stale(older_than_seconds=settings.AGENTRUNNER_REQUEUE_AFTER))
