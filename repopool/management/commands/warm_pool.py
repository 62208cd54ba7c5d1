from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from common.errors import DomainError
from common.schema import require_schema
from repopool import services
from repopool.management.commands.add_repository import call_warm


class Command(BaseCommand):
    help = "Bring a repository's pool on this host up to its size (clone, set up, repair broken slots)."

    def add_arguments(self, parser):
        parser.add_argument("repository", help="Repository name or id.")

    def handle(self, *args, repository, **opts):
        require_schema()
        try:
            repo = services.repository_get(ref=repository)
        except DomainError as exc:
            raise CommandError(exc.message) from None
        if not call_warm(self, repo):
            raise CommandError("some slots are broken (see above)")
