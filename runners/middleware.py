"""A runner token opens the runner API and nothing else.

The user API's token authentication would refuse a runner token anyway (it is not a user's
token), but the admin, the run pages and /metrics look at sessions, not headers: rather than
trust every one of them to ignore the header, any request that presents a runner token outside
/api/runner/ is answered 401 here, before any view runs. No database lookup: the prefix says it.
The path is the one Django routes on (path_info), not request.path: that one starts with the
SCRIPT_NAME the WSGI server sets (a prefix deployment, or a header a trusted proxy passes)."""

from __future__ import annotations

from django.http import JsonResponse

from runners.auth import runner_token_from_header

ALLOWED_PREFIXES = ("/api/runner/", "/api/health/")


class RunnerTokenConfinement:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if header and not request.path_info.startswith(ALLOWED_PREFIXES) and runner_token_from_header(header):
            response = JsonResponse(
                {"detail": "A runner token is accepted only by /api/runner/v1/.", "code": "runner_token_not_allowed"},
                status=401,
            )
            response["WWW-Authenticate"] = 'Token realm="api"'
            return response
        return self.get_response(request)
