from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from common.schema import require_schema
from runners import services
from runners.models import RunnerToken


class Command(BaseCommand):
    help = (
        "Create a runner token and print it (once: only its hash is kept). A runner host uses it as "
        "AGENTRUNNER_RUNNER_TOKEN; it opens /api/runner/v1/ and nothing else."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="A name for the token (e.g. the runner host's name); unique.")

    def handle(self, *args, name, **options):
        require_schema()
        if RunnerToken.objects.filter(name=name).exists():
            raise CommandError(f"a runner token named {name!r} exists; revoke it or pick another name")
        _token, raw = services.runner_token_create(name=name)
        self.stderr.write(f"runner token {name!r} created; it is shown only this once")
        self.stdout.write(raw)
