"""Runner token authentication for the /api/runner/v1/ endpoints.

``Authorization: Bearer art_r_<43 url-safe characters>``. The principal is authenticated but is
not a Django user and never staff: every check that asks ``is_staff`` or looks for a user's own
objects finds nothing. ``IsRunner`` admits only this principal; a user's API token on a runner
endpoint gets 403 ``runner_token_required``."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, TokenAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission

from runners import services
from runners.errors import TokenInvalid, TokenRevoked
from runners.models import RunnerToken

TOKEN_PREFIX = services.TOKEN_PREFIX


class RunnerPrincipal:
    """Who a runner token speaks for: a runner host, not a person."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False
    pk = None
    id = None

    def __init__(self, token: RunnerToken):
        self.token = token

    @property
    def username(self) -> str:
        return f"runner:{self.token.name}"

    def has_perm(self, *args, **kwargs) -> bool:
        return False

    def __str__(self) -> str:
        return self.username


def runner_token_from_header(header: bytes) -> str | None:
    """The runner token an Authorization header carries (Bearer or Token scheme), else None."""
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() not in (b"bearer", b"token"):
        return None
    try:
        key = parts[1].decode("ascii")
    except UnicodeError:
        return None
    return key if key.startswith(TOKEN_PREFIX) else None


def _user_token(header: bytes):
    """A user's API token (``Token``/``Bearer <key>``), recognised on runner endpoints only so that
    IsRunner can answer 403 runner_token_required (a bare 401 would suggest the token is wrong);
    never let through. None for no such header."""
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() not in (b"bearer", b"token"):
        return None
    try:
        key = parts[1].decode("ascii")
    except UnicodeError:
        raise exceptions.AuthenticationFailed("Invalid Authorization header: the token has invalid characters.")
    return TokenAuthentication().authenticate_credentials(key)


class RunnerTokenAuthentication(BaseAuthentication):
    def authenticate(self, request):
        header = get_authorization_header(request)
        key = runner_token_from_header(header)
        if key is None:
            return _user_token(header)
        try:
            token = services.runner_token_authenticate(raw=key)
        except TokenRevoked as exc:
            raise exceptions.AuthenticationFailed(exc.message, code=exc.code) from None
        except TokenInvalid as exc:
            raise exceptions.AuthenticationFailed(exc.message, code=exc.code) from None
        return RunnerPrincipal(token), token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="runner"'


class IsRunner(BasePermission):
    message = "This endpoint takes a runner token (manage.py create_runner_token), not a user's API token."
    code = "runner_token_required"

    def has_permission(self, request, view) -> bool:
        return isinstance(request.user, RunnerPrincipal)


class RunnerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "runners.auth.RunnerTokenAuthentication"
    name = "runnerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A runner token (`art_r_...`, from `manage.py create_runner_token`).",
        }
