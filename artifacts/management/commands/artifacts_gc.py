from __future__ import annotations

import uuid

from django.core.management.base import BaseCommand

from artifacts.services import artifacts_gc
from common.schema import require_schema


def attempt_running(task_id: uuid.UUID, number: int) -> bool:
    """Whether the registry still counts this attempt as running (its run folder is in use)."""
    from registry.models import Attempt, AttemptOutcome

    return Attempt.objects.filter(task_id=task_id, number=number, outcome=AttemptOutcome.RUNNING).exists()


class Command(BaseCommand):
    help = (
        "Remove leftovers of interrupted uploads, stored blobs that no artifact record points to, and run "
        "folders of runners killed mid-task (once their attempt is no longer running)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--grace-seconds", type=int, default=3600, help="Leave anything younger alone (uploads in flight)."
        )
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args, grace_seconds, dry_run, **opts):
        require_schema()
        removed = artifacts_gc(grace_seconds=grace_seconds, dry_run=dry_run, attempt_running=attempt_running)
        verb = "would remove" if dry_run else "removed"
        self.stdout.write(
            f"{verb} {len(removed['temporary'])} temporary file(s), {len(removed['blobs'])} orphan blob(s), "
            f"{len(removed['run_folders'])} abandoned run folder(s)"
        )
        for key in removed["blobs"]:
            self.stdout.write(f"  {key}")
        for name in removed["run_folders"]:
            self.stdout.write(f"  tmp/{name}")
