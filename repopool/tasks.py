"""Celery jobs of the pool: warming runs on a worker (a runner host), never in a web request."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="repopool.warm_requested", ignore_result=True)
def warm_requested(repository_id: int) -> int:
    from repopool.services import pool_warm_requested

    return len(pool_warm_requested(repository_id=repository_id))
