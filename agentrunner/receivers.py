"""Signal receivers of the runner layer: enqueue Celery work when a task becomes runnable."""

from __future__ import annotations

import logging

from django.conf import settings
from django.dispatch import receiver

from registry.signals import task_queued

log = logging.getLogger(__name__)


@receiver(task_queued)
def enqueue_queued_task(sender, task_id, **kwargs) -> None:
    # Without a broker, Celery would run the task inline in the request that queued it;
    # on a laptop `runagent --next/--loop` picks queued tasks up instead.
    if not (settings.CELERY_BROKER_URL and settings.AGENTRUNNER_AUTO_ENQUEUE):
        return
    try:
        from agentrunner.tasks import run_agent_task
        from registry.models import Task

        timeout = Task.objects.filter(pk=task_id).values_list("timeout_seconds", flat=True).first() or 3600
        # Soft limit a little after the task's own wall clock (the pipeline stops itself first),
        # hard limit after that, so a wedged worker still frees its slot through the reaper.
        run_agent_task.apply_async(args=[str(task_id)], soft_time_limit=timeout + 300, time_limit=timeout + 600)
    except Exception as exc:  # broker down: the task stays queued; beat re-enqueues stale ones
        log.warning("could not enqueue task %s: %s", task_id, type(exc).__name__)
