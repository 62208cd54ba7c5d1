from __future__ import annotations

from django.apps import AppConfig


class RunnersConfig(AppConfig):
    name = "runners"
    verbose_name = "Runner hosts and tokens"
    default_auto_field = "django.db.models.BigAutoField"
