"""Celery tasks: thin wrappers over the runner pipeline and the reaper."""

from __future__ import annotations

import logging
import signal

from celery import shared_task
from celery.signals import worker_process_init

from common.errors import DomainError

log = logging.getLogger(__name__)

# True in a prefork pool process (never in a solo worker, whose SIGTERM is the warm shutdown).
_pool_process = {"yes": False}


@worker_process_init.connect
def _mark_pool_process(**kwargs) -> None:
    _pool_process["yes"] = True


def _terminated(signum, frame) -> None:
    """SIGTERM in a pool process running a task: the worker terminates the task (connection to the
    broker lost, task revoked with terminate, cold shutdown). The task winds down as `runagent`
    does on SIGTERM: its attempt ends failed (infrastructure_error) to be retried and its slot is
    released now, instead of staying `running` and leased until the reaper runs. A second SIGTERM
    must not cut that wind-down short (the hard time limit still kills with SIGKILL)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


@shared_task(name="agentrunner.run_agent_task", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_agent_task(task_id: str) -> str:
    """Run one task. A redelivered message for a task that is no longer queued does nothing:
    the attempt count in the database, not the broker, bounds how often a task runs."""
    from agentrunner.llm.config import LLMNotConfigured
    from agentrunner.runner.pipeline import run_task

    # Set per task: the pool installs its own handlers after the process starts.
    previous = signal.signal(signal.SIGTERM, _terminated) if _pool_process["yes"] else None
    try:
        summary = run_task(task_id=task_id)
    except LLMNotConfigured as exc:  # this worker has no model for it: given back, said loudly
        log.warning("%s", exc.message)
        return "not_configured"
    except DomainError as exc:  # not queued any more (claimed elsewhere, cancelled, finished)
        log.info("task %s not run: %s", task_id, exc.message)
        return "skipped"
    except KeyboardInterrupt:  # terminated by the worker: the attempt was ended and the slot freed
        log.warning("task %s terminated by the worker; its attempt ended and will be retried", task_id)
        return "terminated"
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
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
