"""Persistent database connections: on by default for PostgreSQL, off for SQLite, set by env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRINT_DB = (
    "import json, django; from django.conf import settings; django.setup(); "
    "db = settings.DATABASES['default']; print(json.dumps([db['CONN_MAX_AGE'], db['CONN_HEALTH_CHECKS']]))"
)


def db_settings(tmp_path: Path, **env: str) -> list:
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_CONN_MAX_AGE")}
    full_env.update(DJANGO_SETTINGS_MODULE="agentrunner.settings", AGENTRUNNER_DATA_DIR=str(tmp_path), **env)
    done = subprocess.run(
        [sys.executable, "-c", PRINT_DB], cwd=ROOT, env=full_env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DATABASE_URL": "postgres://u@db.invalid/x"}, [60, True]),
        ({"DATABASE_URL": "postgres://u@db.invalid/x", "DJANGO_CONN_MAX_AGE": "0"}, [0, True]),
        ({"DATABASE_URL": ""}, [0, True]),
        ({"DATABASE_URL": "", "DJANGO_CONN_MAX_AGE": "30"}, [30, True]),
    ],
)
def test_conn_max_age(tmp_path, env, expected):
    assert db_settings(tmp_path, **env) == expected
