from __future__ import annotations

from django.apps import AppConfig


class AgentRunnerConfig(AppConfig):
    name = "agentrunner"
    verbose_name = "Agent Runner"

    def ready(self) -> None:
        from django.conf import settings

        for folder in (settings.DATA_DIR, settings.TMP_ROOT, settings.SPOOL_ROOT):
            folder.mkdir(parents=True, exist_ok=True)
        # The Celery app, so shared tasks bind to it (its broker from settings) wherever Django runs.
        from agentrunner import (
            celery,  # noqa: F401
            receivers,  # noqa: F401  (connects signal receivers)
        )
