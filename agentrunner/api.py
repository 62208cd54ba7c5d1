"""Project-level API views: health."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import connection
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
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


def _health_body(name: str):
    return inline_serializer(
        name,
        {
            "status": serializers.CharField(help_text="ok, or failing (then the answer is 503)."),
            "checks": serializers.DictField(
                help_text="database, broker, storage: ok or failing; staff also see why (an exception's class "
                "name, or that the broker is not configured)."
            ),
            "sandbox": serializers.DictField(
                help_text="status: ok (bubblewrap), degraded (commands run unsandboxed, allowed here) or failing "
                "(commands refused); staff also see mode, reason and limits."
            ),
        },
    )


class HealthView(APIView):
    """Public: a load balancer or monitor asks without a token and learns ok / degraded / failing.
    What a failing check or the sandbox says (a path on the host, the exception's class) is for
    staff only. A credential that does not authenticate is ignored here, never a 401."""

    permission_classes = [AllowAny]

    def perform_authentication(self, request) -> None:
        try:
            request.user  # noqa: B018 (authenticates)
        except exceptions.AuthenticationFailed:
            pass  # an unknown or revoked token (a runner's included) sees what anyone sees

    @extend_schema(responses={200: _health_body("Health"), 503: _health_body("HealthFailing")})
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
        flag = SANDBOX_FLAGS.get(sandbox["mode"], "ok")
        if getattr(request.user, "is_staff", False):
            sandbox = {"status": flag, **sandbox}
        else:
            checks = {name: "failing" if value.startswith("failing") else "ok" for name, value in checks.items()}
            sandbox = {"status": flag}
        return Response(
            {"status": "ok" if healthy else "failing", "checks": checks, "sandbox": sandbox},
            status=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE,
        )


# What anyone may learn of the sandbox: commands boxed, run unboxed (allowed here), or refused.
SANDBOX_FLAGS = {"none": "degraded", "unavailable": "failing"}
