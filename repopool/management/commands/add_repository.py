from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from common.errors import DomainError
from common.schema import require_schema
from repopool import services


class Command(BaseCommand):
    help = "Register a repository for the pool (a local path or a git URL)."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("url")
        parser.add_argument("--default-branch", default="")
        parser.add_argument("--pool-size", type=int, default=2)
        parser.add_argument("--setup-command", default="")
        parser.add_argument("--setup-watch", action="append", default=[], help="File whose change re-runs setup.")
        parser.add_argument("--test-command", default="")
        parser.add_argument("--keep", action="append", default=[], help="Path a reset keeps (e.g. .venv).")
        parser.add_argument("--push-url", default="")
        parser.add_argument("--warm", action="store_true", help="Clone the pool now.")

    def handle(self, *args, **opts):
        require_schema()
        try:
            repo = services.repository_create(
                name=opts["name"],
                url=opts["url"],
                default_branch=opts["default_branch"],
                pool_size=opts["pool_size"],
                setup_command=opts["setup_command"],
                setup_watch_files=opts["setup_watch"],
                test_command=opts["test_command"],
                keep_paths=opts["keep"],
                push_url=opts["push_url"],
            )
        except DomainError as exc:
            raise CommandError(exc.message) from None
        except ValidationError as exc:
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None
        self.stdout.write(f"registered {repo.name} (id {repo.pk}, branch {repo.default_branch})")
        if opts["warm"]:
            call_warm(self, repo)


def call_warm(command: BaseCommand, repo) -> bool:
    slots = services.pool_warm(repository=repo)
    ok = True
    for slot in slots:
        line = f"slot {slot.index}: {slot.state} {slot.path}"
        if slot.state == "broken":
            ok = False
            line += f" ({slot.last_error})"
        command.stdout.write(line)
    return ok
