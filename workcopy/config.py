"""The settings the working-copy package runs with.

``current()`` is the configuration every function here reads at call time: the one given to
``configure()``, else the one ``from_settings()`` reads from Django's settings at that moment (so
a test that changes a setting is obeyed at once, as before)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Config:
    pool_root: Path  # where slots live on this host
    tmp_root: Path  # scratch files (setup logs, temporary indexes, exclude files)
    git_timeout: float = 600  # seconds for one git command
    setup_timeout: float = 900  # seconds for a repository's setup command
    results_root: Path | None = None  # the server's results repositories (a push target of ours)
    local_repo_roots: tuple[str, ...] | None = None  # where local origins may live; None = anywhere


_configured: Config | None = None


def configure(config: Config | None) -> None:
    """Use ``config`` from now on (None: read Django's settings again)."""
    global _configured
    _configured = config


def current() -> Config:
    return _configured if _configured is not None else from_settings()


def from_settings() -> Config:
    from django.conf import settings

    roots = settings.AGENTRUNNER_LOCAL_REPO_ROOTS
    return Config(
        pool_root=Path(settings.REPO_POOL_ROOT),
        tmp_root=Path(settings.TMP_ROOT),
        git_timeout=settings.REPO_POOL_GIT_TIMEOUT,
        setup_timeout=settings.REPO_POOL_SETUP_TIMEOUT,
        results_root=Path(settings.RESULTS_ROOT) if getattr(settings, "RESULTS_ROOT", None) else None,
        local_repo_roots=None if roots is None else tuple(str(root) for root in roots),
    )
