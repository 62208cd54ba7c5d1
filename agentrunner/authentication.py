"""API token authentication: ``Authorization: Token <key>`` or ``Authorization: Bearer <key>``.

Both prefixes carry the same DRF token; many HTTP clients and tools only know how to send
``Bearer``. The OpenAPI extension below declares both schemes as alternatives."""

from __future__ import annotations

import functools

from django.utils.translation import gettext as _
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication, get_authorization_header

from common.rows import RowQuery


@functools.cache
def _token_with_user() -> RowQuery:
    """The token and its user in one SELECT compiled once (DRF's ``select_related("user").get(key=...)``
    compiles the same query on every request)."""
    from rest_framework.authtoken.models import Token

    return RowQuery(Token, 'm."key" = %s', related="user")


class TokenOrBearerAuthentication(TokenAuthentication):
    keyword = "Token"  # what the WWW-Authenticate header of a 401 names
    keywords = (b"token", b"bearer")

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() not in self.keywords:
            return None  # another scheme (or none): let the next authenticator try
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Invalid Authorization header: give the scheme and the token, e.g. 'Bearer <token>'."
            )
        try:
            key = parts[1].decode("ascii")
        except UnicodeError:
            raise exceptions.AuthenticationFailed("Invalid Authorization header: the token has invalid characters.")
        return self.authenticate_credentials(key)

    def authenticate_credentials(self, key):
        """DRF's, answers and messages included, with the lookup compiled once."""
        token = None if "\x00" in key else _token_with_user().get(key)  # PostgreSQL refuses NUL in text
        if token is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return (token.user, token)


class TokenOrBearerScheme(OpenApiAuthenticationExtension):
    target_class = "agentrunner.authentication.TokenOrBearerAuthentication"
    name = ["tokenAuth", "bearerAuth"]

    def get_security_requirement(self, auto_schema):
        return [{"tokenAuth": []}, {"bearerAuth": []}]  # either one, not both

    def get_security_definition(self, auto_schema):
        return [
            {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "Token-based authentication with required prefix 'Token'.",
            },
            {"type": "http", "scheme": "bearer", "description": "The same API token, sent as 'Bearer <token>'."},
        ]
