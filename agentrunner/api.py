"""Project-level API views: health."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import connection
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from common.sandbox import sandbox_status

log = logging.getLogger(__name__)


# --- health -------------------------------------------------------------------------------------
def _check_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return "ok"


def _check_broker() -> str:
    if not settings.CELERY_BROKER_URL:
        return "not configured (tasks run in-process)"
    from kombu import Connection

    with Connection(settings.CELERY_BROKER_URL, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
    return "ok"


def _check_storage() -> str:
    from django.core.files.storage import storages

    storages["artifacts"].exists("health-check-probe")
    return "ok"


HEALTH_CHECKS = {"database": _check_database, "broker": _check_broker, "storage": _check_storage}


class HealthView(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        auth=[],
        responses={
            200: inline_serializer(
                "Health",
                {
                    "status": serializers.CharField(),
                    "checks": serializers.DictField(),
                    "sandbox": serializers.DictField(),
                },
            ),
            503: inline_serializer(
                "HealthFailing",
                {
                    "status": serializers.CharField(),
                    "checks": serializers.DictField(),
                    "sandbox": serializers.DictField(),
                },
            ),
        },
    )
    def get(self, request):
        checks: dict[str, str] = {}
        healthy = True
        for name, check in HEALTH_CHECKS.items():
            try:
                checks[name] = check()
            except Exception as exc:  # a failing dependency is reported, never raised
                healthy = False
                # The class name only: exception texts can carry URLs with credentials.
                checks[name] = f"failing: {type(exc).__name__}"
                log.warning("health check %s failing: %s", name, type(exc).__name__)
        # Commands run without a sandbox only where the operator allows it (then still healthy);
        # a runner that must refuse every command is not.
        sandbox = sandbox_status()
        if sandbox["mode"] == "unavailable":
            healthy = False
        return Response(
            {"status": "ok" if healthy else "failing", "checks": checks, "sandbox": sandbox},
            status=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE,
        )
