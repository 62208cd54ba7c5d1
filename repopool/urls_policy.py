"""The repository URL policy lives with the git layer (``workcopy.urls_policy``); re-exported here."""

from __future__ import annotations

from workcopy.urls_policy import ALLOWED_SCHEMES, UrlRefused, check_repository_url

__all__ = ["ALLOWED_SCHEMES", "UrlRefused", "check_repository_url"]
