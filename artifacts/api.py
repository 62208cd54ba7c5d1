"""Artifact endpoints. Uploads stream to temporary files (multipart) or are read in chunks (raw
body); downloads stream from storage in chunks, with ETag, If-None-Match and single Ranges.

The optional task link goes through the registry's services: views sit on top of the apps."""

from __future__ import annotations

import re

from django.conf import settings
from django.http import FileResponse, HttpResponse, StreamingHttpResponse
from django.utils.http import content_disposition_header
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, parsers, permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from artifacts import services
from artifacts.errors import ArtifactTooLarge
from artifacts.models import Artifact
from artifacts.selectors import artifacts_visible_to
from artifacts.serializers import (
    ArtifactFilterSerializer,
    ArtifactSerializer,
    MultipartUploadSerializer,
    UploadParamsSerializer,
)
from common.drf import errors

CHUNK = 1024 * 1024
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RawBodyParser(parsers.BaseParser):
    """Accepts any content type for raw uploads; the view reads the body itself, in chunks."""

    media_type = "*/*"

    def parse(self, stream, media_type=None, parser_context=None):
        return {}


class IsStaffForDelete(permissions.IsAuthenticated):
    def has_permission(self, request, view):
        if not super().has_permission(request, view):
            return False
        return request.method != "DELETE" or bool(request.user and request.user.is_staff)


def _request_chunks(request, length: int):
    remaining = length
    while remaining > 0:
        chunk = request.read(min(CHUNK, remaining))
        if not chunk:
            return  # client went away: the service sees a short stream
        remaining -= len(chunk)
        yield chunk


class ArtifactViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = ArtifactSerializer
    permission_classes = [IsStaffForDelete]
    parser_classes = [parsers.MultiPartParser, RawBodyParser]

    def get_queryset(self):
        queryset = artifacts_visible_to(self.request.user)
        if self.action == "list":
            query = ArtifactFilterSerializer(data=self.request.query_params)
            query.is_valid(raise_exception=True)
            if "kind" in query.validated_data:
                queryset = queryset.filter(kind=query.validated_data["kind"])
            if "task" in query.validated_data:
                queryset = queryset.filter(task_links__task_id=query.validated_data["task"]).distinct()
        return queryset

    @extend_schema(
        parameters=[ArtifactFilterSerializer],
        responses={200: ArtifactSerializer(many=True), **errors(400, 401, 403, 404)},
    )
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(responses={200: ArtifactSerializer, **errors(401, 403, 404)})
    def retrieve(self, request, *args, **kwargs):
        return super().retrieve(request, *args, **kwargs)

    @extend_schema(
        description=(
            "Multipart (`file`, `name`, `kind`, `task`, `metadata`, `sha256`) or a raw body (its own "
            "Content-Type; `name`, `kind`, `task` in the query string). `X-Content-SHA256` is checked."
        ),
        parameters=[
            UploadParamsSerializer,
            OpenApiParameter("X-Content-SHA256", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False),
        ],
        request={"multipart/form-data": MultipartUploadSerializer, "application/octet-stream": OpenApiTypes.BINARY},
        responses={201: ArtifactSerializer, **errors(400, 401, 403, 404, 411, 413, 503, 507)},
    )
    def create(self, request):
        django_request = request._request
        content_type = request.META.get("CONTENT_TYPE", "")
        header_sha = request.META.get("HTTP_X_CONTENT_SHA256", "")
        try:
            length = int(request.META.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if length > settings.ARTIFACTS_MAX_SIZE:
            raise ArtifactTooLarge(f"artifact exceeds the maximum size of {settings.ARTIFACTS_MAX_SIZE} bytes")
        if content_type.startswith("multipart/form-data"):
            try:  # Django spools the file part to FILE_UPLOAD_TEMP_DIR while parsing: the disk may fill
                fields, files = request.data, request.FILES
            except OSError as exc:
                _discard_partial_uploads(django_request)
                raise services.storage_error(exc) from None
            form = MultipartUploadSerializer(data={**fields.dict(), "file": files.get("file")})
            form.is_valid(raise_exception=True)
            params = form.validated_data
            upload = params["file"]
            source, expected_size = upload, upload.size
            name = params["name"] or upload.name
            content_type = getattr(upload, "content_type", "") or ""
        else:
            if length < 0:
                return Response(
                    {"detail": "A raw upload needs a Content-Length header.", "code": "length_required"},
                    status=status.HTTP_411_LENGTH_REQUIRED,
                )
            query = UploadParamsSerializer(data=request.query_params.dict())
            query.is_valid(raise_exception=True)
            params = query.validated_data
            source, expected_size = _request_chunks(django_request, length), length
            name = params["name"] or "upload"
            content_type = content_type.split(";")[0].strip() if content_type else ""
        task_id = params.get("task")
        if task_id is not None:
            from registry.services import task_artifact_link_check

            task_artifact_link_check(task_id=task_id, user=request.user)
        artifact = services.artifact_store(
            source=source,
            name=name,
            kind=params["kind"],
            content_type=content_type,
            metadata=params["metadata"],
            expected_sha256=header_sha or params.get("sha256") or None,
            expected_size=expected_size,
            on_stored=_linker(task_id, params.get("role") or params["kind"]),
            owner=request.user,
        )
        return Response(ArtifactSerializer(artifact).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={204: None, **errors(401, 403, 404)})
    def destroy(self, request, pk=None):
        services.artifact_delete(artifact_id=self.get_object().pk)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        parameters=[
            OpenApiParameter("Range", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False),
            OpenApiParameter("If-None-Match", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False),
        ],
        responses={
            (200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description="The bytes."),
            (206, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description="A byte range."),
            304: OpenApiResponse(description="Not modified (ETag matched)."),
            416: OpenApiResponse(description="Range not satisfiable."),
            **errors(401, 403, 404),
        },
    )
    @action(detail=True, methods=["get"])
    def content(self, request, pk=None):
        artifact = self.get_object()
        return content_response(request, artifact)


def _discard_partial_uploads(django_request) -> None:
    """Close (and so delete) the temporary file of a multipart part whose writing failed."""
    for handler in django_request.upload_handlers:
        partial = getattr(handler, "file", None)
        if partial is not None:
            partial.close()


def _linker(task_id, role):
    if task_id is None:
        return None

    def link(artifact):
        from registry.services import task_artifact_link

        task_artifact_link(task_id=task_id, artifact_id=artifact.pk, role=role)

    return link


def content_response(request, artifact: Artifact) -> HttpResponse:
    """Stream an artifact's bytes: ETag/If-None-Match, one Range, a safe Content-Disposition."""
    etag = f'"{artifact.sha256}"'
    inline = artifact.content_type.startswith("text/") or artifact.kind in ("patch", "log", "test_report")
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition_header(not inline, artifact.name),
        "X-Content-Type-Options": "nosniff",
        "X-Content-SHA256": artifact.sha256,
    }
    # Text is served as plain text so a browser never renders an uploaded page.
    content_type = "text/plain; charset=utf-8" if inline else artifact.content_type
    if_none_match = request.headers.get("If-None-Match", "")
    if if_none_match and (if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]):
        response = HttpResponse(status=304)
        for key in ("ETag", "Accept-Ranges"):
            response[key] = headers[key]
        return response
    size = artifact.size
    range_header = request.headers.get("Range", "")
    match = RANGE_RE.match(range_header.strip()) if range_header else None
    if range_header and (match is None or match.group(1) == match.group(2) == ""):
        match = None
        range_header = ""  # malformed or multi-range: ignored, the whole content is sent (RFC 9110)
    if match:
        first, last = match.groups()
        if first == "":
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        if start >= size or start > end:
            response = HttpResponse(status=416)
            response["Content-Range"] = f"bytes */{size}"
            return response
        handle = services.artifact_open(artifact=artifact)
        handle.seek(start)
        response = StreamingHttpResponse(_read_range(handle, end - start + 1), status=206, content_type=content_type)
        response["Content-Range"] = f"bytes {start}-{end}/{size}"
        response["Content-Length"] = str(end - start + 1)
    else:
        handle = services.artifact_open(artifact=artifact)
        response = FileResponse(handle, content_type=content_type)
        response.block_size = CHUNK
        response["Content-Length"] = str(size)
    for key, value in headers.items():
        response[key] = value
    return response


def _read_range(handle, length: int):
    try:
        while length > 0:
            chunk = handle.read(min(CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)
            yield chunk
    finally:
        handle.close()
