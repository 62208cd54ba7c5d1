from __future__ import annotations

from django.core.management.base import BaseCommand

from artifacts.services import artifacts_gc
from common.schema import require_schema


class Command(BaseCommand):
    help = "Remove leftovers of interrupted uploads and stored blobs that no artifact record points to."

    def add_arguments(self, parser):
        parser.add_argument(
            "--grace-seconds", type=int, default=3600, help="Leave anything younger alone (uploads in flight)."
        )
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args, grace_seconds, dry_run, **opts):
        require_schema()
        removed = artifacts_gc(grace_seconds=grace_seconds, dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        self.stdout.write(
            f"{verb} {len(removed['temporary'])} temporary file(s), {len(removed['blobs'])} orphan blob(s)"
        )
        for key in removed["blobs"]:
            self.stdout.write(f"  {key}")
