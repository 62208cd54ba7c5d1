"""Reads of the artifact store that depend on who asks."""

from __future__ import annotations

from django.db.models import Q, QuerySet

from artifacts.models import Artifact
from common.permissions import is_staff


def artifacts_visible_to(user) -> QuerySet[Artifact]:
    """Staff see every artifact; anyone else what they uploaded and what is linked to their tasks.

    (The link lives in the registry; the lookup goes through the reverse relation by name, so
    this app imports nothing of the registry.)"""
    if is_staff(user):
        return Artifact.objects.all()
    mine = Artifact.objects.filter(Q(owner=user) | Q(task_links__task__owner=user)).values("pk")
    return Artifact.objects.filter(pk__in=mine)
