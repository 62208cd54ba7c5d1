from __future__ import annotations

from django.core.management.base import BaseCommand

from agentrunner.reaping import reap
from common.schema import require_schema


class Command(BaseCommand):
    help = "Reset and free slots whose lease expired; mark attempts of dead runners lost and requeue their tasks."

    def handle(self, *args, **opts):
        require_schema()
        report = reap()
        self.stdout.write(f"reaped {len(report.slots)} slot(s), {len(report.attempts)} lost attempt(s)")
