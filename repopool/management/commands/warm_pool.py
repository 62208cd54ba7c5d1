from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from common.errors import DomainError
from common.schema import require_schema
from repopool import services
from repopool.management.commands.add_repository import call_warm


class Command(BaseCommand):
    help = "Bring a repository's pool on this host up to its size (clone, set up, repair broken slots)."

    def add_arguments(self, parser):
        parser.add_argument("repository", nargs="?", help="Repository name or id.")
        parser.add_argument(
            "--pending", action="store_true", help="Warm every repository whose warm was requested (API, admin)."
        )

    def handle(self, *args, repository, **opts):
        require_schema()
        if opts["pending"] == bool(repository):
            raise CommandError("give a repository, or --pending")
        if opts["pending"]:
            warmed = services.pool_warm_requested()
            self.stdout.write(f"warmed {len(warmed)} repositor{'y' if len(warmed) == 1 else 'ies'}")
            for repo in warmed:
                self.stdout.write(f"{repo.name}: {repo.slot_counts()}")
            return
        try:
            repo = services.repository_get(ref=repository)
        except DomainError as exc:
            raise CommandError(exc.message) from None
        if not call_warm(self, repo):
            raise CommandError("some slots are broken (see above)")
