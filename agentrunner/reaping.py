"""Recovery of what dead runners leave behind: expired slot leases and attempts without heartbeat."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from registry import services as registry
from repopool import services as pool


@dataclass
class ReapReport:
    slots: list[int]
    attempts: list[int]


def reap() -> ReapReport:
    slots = pool.slots_reap()
    attempts = registry.attempts_reap_lost(stale_after_seconds=settings.AGENTRUNNER_ATTEMPT_STALE_SECONDS)
    return ReapReport(slots=slots, attempts=[a.pk for a in attempts])
