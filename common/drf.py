"""DRF plumbing shared by every app: error mapping, pagination, parsers.

No import of rest_framework.views at module level: DRF imports this module while loading views."""

from __future__ import annotations

import datetime
import functools
import math

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import DateTimeField
from django.http import Http404, HttpRequest, HttpResponse, HttpResponsePermanentRedirect, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, parsers, serializers
from rest_framework.pagination import CursorPagination, PageNumberPagination
from rest_framework.response import Response

from common.errors import DomainError, UnavailableError


class SharedFields:
    """Mixin for a serializer whose fields are built once per class instead of deep-copied for
    every instance (DRF's way; that copy was a third of validating a task's body).

    For input serializers only, whose fields keep no state of a request and read no context:
    validating reads a field, never changes it. Their ``parent`` (and ``context``) is one
    prototype instance of the class; the serializer's own ``validate_*`` methods still run on the
    instance (with its context), and the errors are DRF's own."""

    @property
    def fields(self):
        return _shared_fields(type(self))


@functools.cache
def _shared_fields(cls):
    prototype = cls()
    return serializers.Serializer.fields.func(prototype)  # DRF's own: a deep copy, bound to the prototype


class _CursorPages(CursorPagination):
    page_size_query_param = "page_size"
    max_page_size = 500

    def paginate_queryset(self, queryset, request, view=None):
        self._position_field = queryset.model._meta.get_field(self.ordering[0].lstrip("-"))
        try:
            return super().paginate_queryset(queryset, request, view)
        # Undecodable, or a position of the wrong type (a date where a number belongs raises ValueError),
        # or a date out of range once in UTC (OverflowError).
        except (exceptions.NotFound, DjangoValidationError, ValueError, TypeError, OverflowError):
            raise exceptions.ValidationError({"cursor": ["Invalid cursor: use the next or previous link as given."]})

    def decode_cursor(self, request):
        """DRF's, with a date position given in UTC, as the links give it: PostgreSQL refuses a UTC
        offset past 15:59, which Python reads (up to 23:59), and the query failed with a 500."""
        cursor = super().decode_cursor(request)
        if cursor is not None and cursor.position is not None and isinstance(self._position_field, DateTimeField):
            position = self._position_field.to_python(cursor.position)
            if position.utcoffset() is not None:
                position = position.astimezone(datetime.UTC)
            cursor = cursor._replace(position=str(position))
        return cursor


class Pagination(PageNumberPagination):
    """Page numbers with an exact count (``?page=``, ``?page_size=``), the default.

    A view that sets ``cursor_ordering`` (a unique order, e.g. ``("-created_at", "-id")``) also
    serves cursor pages when asked with ``?cursor=`` (empty for the first page, then the ``next``
    or ``previous`` link): a keyset query whose cost does not grow with the table, and no count
    unless ``?count=exact`` is given too (a COUNT(*) reads the whole table)."""

    page_size_query_param = "page_size"
    max_page_size = 500
    cursor_ordering: tuple[str, ...] | None = None

    def paginate_queryset(self, queryset, request, view=None):
        self.cursor = None
        if not self.cursor_ordering or "cursor" not in request.query_params:
            return super().paginate_queryset(queryset, request, view)
        wanted = request.query_params.get("count")
        if wanted not in (None, "exact"):
            raise exceptions.ValidationError({"count": ["Give count=exact for an exact count, or leave it out."]})
        self.cursor = _CursorPages()
        self.cursor.ordering = self.cursor_ordering
        self.exact_count = queryset.count() if wanted == "exact" else None
        return self.cursor.paginate_queryset(queryset, request, view)

    def get_paginated_response(self, data):
        if self.cursor is None:
            return super().get_paginated_response(data)
        body = {} if self.exact_count is None else {"count": self.exact_count}
        body.update(next=self.cursor.get_next_link(), previous=self.cursor.get_previous_link(), results=data)
        return Response(body)

    def get_paginated_response_schema(self, schema):
        response = super().get_paginated_response_schema(schema)
        if self.cursor_ordering:
            response["required"] = ["results"]
            response["properties"]["count"]["description"] = (
                "Exact number of results: always with page numbers; with cursor pages only when count=exact."
            )
        return response

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        if self.cursor_ordering:
            parameters += [
                {
                    "name": "cursor",
                    "required": False,
                    "in": "query",
                    "description": "Cursor pages instead of page numbers: empty for the first page, then the "
                    "value in the next or previous link. Each page costs the same however long the list.",
                    "schema": {"type": "string"},
                },
                {
                    "name": "count",
                    "required": False,
                    "in": "query",
                    "description": "With cursor: 'exact' adds the exact count (it reads every matching row).",
                    "schema": {"type": "string", "enum": ["exact"]},
                },
            ]
        return parameters

    def get_cursor_parameters(self) -> list:
        """The cursor, count and page_size parameters, for a view that serves cursor pages only when
        asked (and pages otherwise by its own means), as drf-spectacular parameters."""
        from drf_spectacular.utils import OpenApiParameter

        return [
            OpenApiParameter(
                "cursor",
                str,
                description="Cursor pages: empty for the first page, then the value in the next or previous "
                "link. Each page costs the same however long the list.",
            ),
            OpenApiParameter(
                "count",
                str,
                enum=["exact"],
                description="With cursor: 'exact' adds the exact count (it reads every matching row).",
            ),
            OpenApiParameter(
                "page_size",
                int,
                description=f"With cursor: results a page (default {self.page_size}, at most {self.max_page_size}).",
            ),
        ]


class PayloadTooLarge(exceptions.APIException):
    status_code = 413
    default_detail = "Request body too large."
    default_code = "too_large"


MAX_JSON_DEPTH = 64


def json_problem(value, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why parsed JSON cannot be taken (None when it can): nested deeper than ``limit``, a string
    with a lone surrogate (no UTF-8 for it: the database refuses it), a number too large for a float
    (1e999 parses as infinity, which jsonb refuses). Walked without recursion; says where."""

    def bad(item) -> str | None:
        if isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds a lone surrogate (\\ud800-\\udfff)"
        elif isinstance(item, float) and not math.isfinite(item):
            return "a number is out of range"
        return None

    def where(trail) -> str:
        keys = []
        while trail:
            trail, key = trail
            keys.append(str(key).encode("ascii", "backslashreplace").decode()[:40])
        return ".".join(reversed(keys))[:200]

    if not isinstance(value, (dict, list)):
        reason = bad(value)
        return f"JSON parse error - {reason}." if reason else None
    stack = [(value, 1, ())]
    while stack:
        node, depth, trail = stack.pop()
        if depth > limit:
            return f"JSON parse error - nested deeper than {limit} levels."
        for key, item in node.items() if type(node) is dict else enumerate(node):
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, depth + 1, (trail, key)))
            elif (
                (kind is str and not item.isascii()) or kind is float or (type(key) is str and not key.isascii())
            ) and (reason := bad(key) or bad(item)):
                return f"JSON parse error - {reason} (at {where((trail, key))})."
    return None


class LimitedJSONParser(parsers.JSONParser):
    """JSON bodies are small: refuse one larger than DATA_UPLOAD_MAX_MEMORY_SIZE before reading it,
    and one nested deeper than MAX_JSON_DEPTH (the decoder's own RecursionError would be a 500, and
    every later walk over the data, validators and jsonb included, would have to survive it) or
    holding what no database column takes (see ``json_problem``)."""

    def parse(self, stream, media_type=None, parser_context=None):
        request = (parser_context or {}).get("request")
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if request is not None and limit is not None:
            try:
                length = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if length > limit:
                raise PayloadTooLarge(f"Request body of {length} bytes exceeds the limit of {limit} bytes.")
        try:
            data = super().parse(stream, media_type, parser_context)
            problem = json_problem(data)
        except RecursionError:
            problem = f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels."
        if problem:
            raise exceptions.ParseError(problem)
        return data


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField()
    errors = serializers.DictField(child=serializers.ListField(child=serializers.CharField()), required=False)


def _body(detail: str, code: str, errors: dict | None = None) -> dict:
    body = {"detail": detail, "code": code}
    if errors:
        body["errors"] = errors
    return body


def exception_handler(exc, context):
    """One mapping from errors to JSON responses: ``{"detail", "code", "errors": {field: [...]}}``."""
    if isinstance(exc, DomainError):
        errors = {exc.field: [exc.message]} if exc.field else None
        response = Response(_body(exc.message, exc.code, errors), status=exc.status_code)
        if isinstance(exc, UnavailableError):
            response["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return Response(_body(f"Request body exceeds the limit of {limit} bytes.", "too_large"), status=413)
    if isinstance(exc, DjangoValidationError):
        errors = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        return Response(_body("Invalid input.", "invalid", errors), status=400)
    from rest_framework.views import exception_handler as drf_exception_handler

    if isinstance(exc, (Http404, PermissionDenied)):
        exc = exceptions.NotFound() if isinstance(exc, Http404) else exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        data = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        response.data = _body("Invalid input.", "invalid", _stringify(data))
    elif isinstance(exc, exceptions.UnsupportedMediaType) and _expects_json_only(context):
        response.data = _body(f"{exc.detail} {JSON_EXPECTED}", "unsupported_media_type")
    elif isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        response.data = _body(str(exc.detail), codes if isinstance(codes, str) else "error")
    return response


JSON_EXPECTED = "Send a JSON body with Content-Type: application/json."


def _expects_json_only(context) -> bool:
    request = (context or {}).get("request")
    parsers_ = getattr(request, "parsers", None) or []
    return bool(parsers_) and all(parser.media_type == "application/json" for parser in parsers_)


def _stringify(data) -> dict[str, list[str]]:
    """Validation errors as ``{field: [reason, ...]}``; nested errors (list items, nested
    objects) become reasons that say where: ``"item 0: Must be a valid UUID."``."""
    return {str(field): _messages(value) for field, value in data.items()}


def _messages(value, where: str = "") -> list[str]:
    prefix = f"{where}: " if where else ""
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            label = f"item {key}" if str(key).isdigit() else str(key)
            out.extend(_messages(item, f"{where} {label}".strip() if where else label))
        return out
    if isinstance(value, list):
        out = []
        for item in value:
            out.extend(_messages(item, where) if isinstance(item, (dict, list)) else [f"{prefix}{item}"])
        return out
    return [f"{prefix}{value}"]


# Standard error responses for the schema, so each endpoint lists every code it can return.
def errors(*codes: int) -> dict:
    return {code: ErrorSerializer for code in codes}


# --- answers for what no API view handles -------------------------------------------------------
@csrf_exempt  # nothing here changes state; without it a POST got Django's HTML CSRF page, not JSON
def api_not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    """Catch-all for ``/api/...``: a JSON 404 in the usual shape (never Django's HTML page, which
    with DEBUG on lists every URL pattern). A path that only lacks its trailing slash is redirected
    for GET and HEAD, as APPEND_SLASH did; other methods are told which path to use, because a
    redirect would drop the body."""
    slashed = request.path + "/"
    if not request.path.endswith("/") and _routes_to_a_view(slashed):
        if request.method in ("GET", "HEAD"):
            query = request.META.get("QUERY_STRING", "")
            return HttpResponsePermanentRedirect(slashed + (f"?{query}" if query else ""))
        detail = f"Not found: {request.path} needs a trailing slash ({slashed})."
    else:
        detail = f"Not found: no API endpoint or object at {request.path}."
    return JsonResponse(_body(detail, "not_found"), status=404)


def _routes_to_a_view(path: str) -> bool:
    try:
        return resolve(path).func is not api_not_found
    except Resolver404:
        return False


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler400 (a disallowed Host header, too many form fields...): JSON under /api/."""
    if request.path.startswith("/api/"):
        return JsonResponse(_body("Bad request.", "bad_request"), status=400)
    from django.views.defaults import bad_request as django_bad_request

    return django_bad_request(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    """handler500: JSON under /api/ (no traceback, no settings), Django's plain page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse(_body("Internal server error.", "server_error"), status=500)
    from django.views.defaults import server_error as django_server_error

    return django_server_error(request)
