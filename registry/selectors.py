"""Reads of the registry that depend on who asks."""

from __future__ import annotations

from django.db.models import QuerySet

from common.permissions import is_staff
from registry.models import Task


def tasks_visible_to(user, queryset: QuerySet[Task] | None = None) -> QuerySet[Task]:
    """Staff see every task; anyone else only the tasks they submitted."""
    queryset = Task.objects.all() if queryset is None else queryset
    return queryset if is_staff(user) else queryset.filter(owner=user)
