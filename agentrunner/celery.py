"""The Celery app. Without CELERY_BROKER_URL tasks run eagerly in-process (laptop mode)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentrunner.settings")

app = Celery("agentrunner")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
