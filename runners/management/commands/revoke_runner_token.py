from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from common.schema import require_schema
from runners import services
from runners.models import RunnerToken


class Command(BaseCommand):
    help = "Revoke a runner token at once: its next request gets 401 token_revoked."

    def add_arguments(self, parser):
        parser.add_argument("name")

    def handle(self, *args, name, **options):
        require_schema()
        token = RunnerToken.objects.filter(name=name).first()
        if token is None:
            raise CommandError(f"no runner token named {name!r}")
        token = services.runner_token_revoke(token_id=token.pk)
        self.stdout.write(f"revoked {name} ({token.prefix}…) at {token.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
