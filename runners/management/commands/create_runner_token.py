from __future__ import annotations

from django.conf import settings
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
        parser.add_argument(
            "--max-hosts",
            type=int,
            default=None,
            help="How many host names the token may register (default: AGENTRUNNER_RUNNER_MAX_HOSTS, "
            f"now {settings.AGENTRUNNER_RUNNER_MAX_HOSTS}); the admin changes it later.",
        )

    def handle(self, *args, name, max_hosts, **options):
        if max_hosts is not None and max_hosts < 1:
            raise CommandError("--max-hosts must be at least 1")
        require_schema()
        if RunnerToken.objects.filter(name=name).exists():
            raise CommandError(f"a runner token named {name!r} exists; revoke it or pick another name")
        token, raw = services.runner_token_create(name=name, max_hosts=max_hosts)
        self.stderr.write(
            f"runner token {name!r} created (it may register at most {token.host_limit} host name(s)); "
            "it is shown only this once"
        )
        self.stdout.write(raw)
