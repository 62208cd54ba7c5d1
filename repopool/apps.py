from __future__ import annotations

from django.apps import AppConfig


class RepopoolConfig(AppConfig):
    name = "repopool"
