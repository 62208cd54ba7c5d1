from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django import template
from django.utils import timezone

register = template.Library()


@register.filter
def seconds(value) -> str:
    """3.2 -> '3.2s', 75 -> '1m 15s', 7260 -> '2h 01m'."""
    if value is None or value == "":
        return "–"
    total = float(value)
    if total < 10:
        return f"{total:.2f}s" if total < 1 else f"{total:.1f}s"
    total = int(round(total))
    if total < 3600:
        return f"{total // 60}m {total % 60:02d}s" if total >= 60 else f"{total}s"
    if total < 86400:
        return f"{total // 3600}h {total % 3600 // 60:02d}m"
    return f"{total // 86400}d {total % 86400 // 3600:02d}h"


@register.simple_tag
def run_duration(task, now=None) -> str:
    """Finished: how long it ran; running: elapsed so far; otherwise a dash."""
    if task.started_at is None:
        return "–"
    end = task.finished_at or (now or timezone.now())
    return seconds((end - task.started_at).total_seconds())


@register.filter
def age(value, now=None) -> str:
    if not value:
        return "–"
    delta = ((now if isinstance(now, dt.datetime) else timezone.now()) - value).total_seconds()
    return seconds(max(delta, 0)) + " ago"


@register.filter
def usd(value) -> str:
    if value is None or value == "":
        return "–"
    amount = Decimal(str(value))
    return f"${amount:.4f}" if amount < 1 else f"${amount:,.2f}"


@register.filter
def count(value) -> str:
    if value is None:
        return "–"
    number = int(value)
    if number >= 1_000_000:
        return f"{number / 1_000_000:.1f}M"
    if number >= 10_000:
        return f"{number / 1000:.1f}k"
    return f"{number:,}"


@register.filter
def nbytes(value) -> str:
    size = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@register.filter
def plain(value) -> str:
    """An enum value in words: 'tests_failed' -> 'tests failed'."""
    return str(value or "").replace("_", " ")


@register.filter
def get(mapping, key):
    return mapping.get(key) if mapping else None
