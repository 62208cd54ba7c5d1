"""Notifications other layers subscribe to (the runner enqueues Celery work on them)."""

from __future__ import annotations

import django.dispatch

# Sent after the transaction that made a task runnable (status ``queued``) has committed.
# Arguments: task_id.
task_queued = django.dispatch.Signal()
