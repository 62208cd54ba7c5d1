from __future__ import annotations

import os
import sys
import time

from django.conf import settings
from django.db import connection

from tests.runner.conftest import API_KEY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def database_url() -> str:
    """The URL of the test database, for a subprocess (runagent, a Celery worker) to share it."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{db['NAME']}"


def child_env(llm, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "AGENTRUNNER_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="agentrunner.settings",
        DATABASE_URL=database_url(),
        AGENTRUNNER_DATA_DIR=str(settings.DATA_DIR),
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=llm.base_url,
        AGENTRUNNER_LLM_MODEL="test-model",
        AGENTRUNNER_LOG_LEVEL="WARNING",
        PYTHONPATH=ROOT,
    )
    env.update(extra)
    return env


def manage(*args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "manage.py"), *args]


def wait_for(condition, timeout: float = 30, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message}")
