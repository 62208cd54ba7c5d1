from __future__ import annotations

from django.core.management.base import BaseCommand

from common.schema import require_schema
from runners.models import RunnerToken


def _when(value) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value else "-"


class Command(BaseCommand):
    help = "List runner tokens: name, prefix, created, last used, revoked, max hosts, hosts (never the token)."

    def handle(self, *args, **options):
        require_schema()
        rows = [("NAME", "PREFIX", "CREATED", "LAST USED", "REVOKED", "MAX HOSTS", "HOSTS")]
        for token in RunnerToken.objects.prefetch_related("hosts"):
            hosts = ",".join(host.name for host in token.hosts.all()) or "-"
            rows.append(
                (
                    token.name,
                    token.prefix,
                    _when(token.created_at),
                    _when(token.last_used_at),
                    _when(token.revoked_at),
                    str(token.host_limit) + ("" if token.max_hosts else " (default)"),
                    hosts,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
