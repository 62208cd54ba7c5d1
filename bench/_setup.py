"""Shared bench plumbing: a throwaway data folder and database, Django set up on them."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def django_in_tempdir(prefix: str) -> Path:
    """Point Agent Runner at a fresh data folder (SQLite unless DATABASE_URL is set) and migrate."""
    data = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["AGENTRUNNER_DATA_DIR"] = str(data)
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{data / 'bench.sqlite3'}")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentrunner.settings")
    os.environ.setdefault("AGENTRUNNER_LOG_LEVEL", "WARNING")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return data


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
