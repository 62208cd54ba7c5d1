"""A database that went away (restarted, failed over, unreachable) answers 503 with Retry-After:
the client may try again shortly. Not a 500 with a traceback in the log for every request: the
server itself is fine, and serves again without a restart once the database is back (each
request's connection is health-checked, see CONN_HEALTH_CHECKS in the settings)."""

from __future__ import annotations

import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
DETAIL = "The database is unavailable; try again shortly."


class DatabaseUnavailableMiddleware:
    """Turns a connection-level database error raised by a view (API views re-raise what the DRF
    handler does not map) into 503 ``{detail, code: "database_unavailable"}`` under /api/, a short
    HTML page elsewhere. Other errors pass on untouched."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        # The class name only: the message can name hosts and users of the database.
        log.warning(
            "database unavailable (%s): %s %s answered 503", type(exception).__name__, request.method, request.path
        )
        if request.path.startswith("/api/") or request.path.startswith("/metrics"):
            response: HttpResponse = JsonResponse({"detail": DETAIL, "code": "database_unavailable"}, status=503)
        else:
            response = HttpResponse(
                f"<!doctype html><title>Service unavailable</title><h1>Service unavailable</h1><p>{DETAIL}</p>",
                status=503,
            )
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
