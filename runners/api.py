"""The runner API, ``/api/runner/v1/``: what a runner host does, over HTTP, with a runner token.

Thin views: parse, call one service (through the idempotency layer), present. Attempt-scoped
calls carry ``X-Lease-Token``; a wrong token or an attempt no longer running is 409 lease_lost."""

from __future__ import annotations

import json
import re

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from artifacts.api import RawBodyParser, _request_chunks
from artifacts.errors import ArtifactTooLarge
from common.drf import errors
from common.errors import DomainError
from runners import idempotency, services
from runners.auth import IsRunner, RunnerTokenAuthentication
from runners.serializers import (
    ClaimReplySerializer,
    ClaimSerializer,
    EventsReplySerializer,
    EventsSerializer,
    FinishReplySerializer,
    FinishSerializer,
    HeartbeatReplySerializer,
    HeartbeatSerializer,
    HostReplySerializer,
    HostSerializer,
    LinkReplySerializer,
    LinkSerializer,
    OkSerializer,
    ResultsReplySerializer,
    SlotAllocateReplySerializer,
    SlotAllocateSerializer,
    SlotPreparedSerializer,
    SlotReleaseSerializer,
    SlotRenewReplySerializer,
    SlotRenewSerializer,
    SlotStateReplySerializer,
    UploadReplySerializer,
    UsageSerializer,
    claim_reply,
    slot_grant_reply,
)

RESULT_HEADERS = ("X-Result-Branch", "X-Result-Base", "X-Content-SHA256")
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=True,
    description="1-128 characters [A-Za-z0-9._:-]; a retry with the same key replays the first answer.",
)
LEASE_TOKEN = OpenApiParameter(
    "X-Lease-Token", OpenApiTypes.STR, OpenApiParameter.HEADER, required=True, description="The attempt's lease token."
)


class RunnerView(APIView):
    authentication_classes = [RunnerTokenAuthentication]
    permission_classes = [IsRunner]


def _valid(serializer_class, data) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def _content_length(request) -> int:
    try:
        return int(request.META.get("CONTENT_LENGTH") or -1)
    except ValueError:
        return -1


def _length_required() -> Response:
    return Response(
        {"detail": "An upload needs a Content-Length header.", "code": "length_required"},
        status=status.HTTP_411_LENGTH_REQUIRED,
    )


ROLE_RE = re.compile(r"^[A-Za-z0-9_.:-]{0,64}$")
METADATA_MAX = 2048


def _artifact_metadata(raw: str) -> dict | None:
    """The runner's X-Artifact-Metadata: a small JSON object, else 400 naming the header."""
    if not raw:
        return None
    if len(raw) > METADATA_MAX:
        raise DomainError(f"X-Artifact-Metadata exceeds {METADATA_MAX} bytes.", field="X-Artifact-Metadata")
    try:
        value = json.loads(raw)
    except ValueError:
        raise DomainError("X-Artifact-Metadata is not valid JSON.", field="X-Artifact-Metadata") from None
    if not isinstance(value, dict):
        raise DomainError("X-Artifact-Metadata must be a JSON object.", field="X-Artifact-Metadata")
    return value


def _lease_token(request) -> str:
    token = request.headers.get("X-Lease-Token", "").strip()
    if not token:
        raise DomainError("Attempt calls need the X-Lease-Token header (from the claim).", field="X-Lease-Token")
    return token


class HostsView(RunnerView):
    @extend_schema(
        parameters=[IDEMPOTENCY_KEY],
        request=HostSerializer,
        responses={200: HostReplySerializer, **errors(400, 401, 403, 409, 422)},
        description="Announce this runner host and its capacity per repository. A host name is bound to "
        "the first token that registers it (409 host_taken for another); a token registers at most its "
        "max hosts (AGENTRUNNER_RUNNER_MAX_HOSTS unless set on the token): 409 host_limit_reached beyond.",
    )
    def post(self, request):
        idem = idempotency.from_request(request)
        data = _valid(HostSerializer, request.data)

        def effect():
            host = services.host_register(token=request.auth, **data)
            return Response({"name": host.name})

        return idempotency.respond(idem, effect)


class ClaimView(RunnerView):
    @extend_schema(
        parameters=[IDEMPOTENCY_KEY],
        request=ClaimSerializer,
        responses={200: ClaimReplySerializer, 204: None, **errors(400, 401, 403, 404, 409, 422)},
        description="Claim the next runnable task (or `task_id`). With `wait` (at most 30 s) the call "
        "waits for one to become runnable; 204 when none did.",
    )
    def post(self, request):
        idem = idempotency.from_request(request)
        data = _valid(ClaimSerializer, request.data)

        def claim_once():
            from registry.services import task_claim

            services.runner_token_check_live(token=request.auth)
            got = task_claim(runner_id=data["runner_id"], task_id=data["task_id"], replay_only=data["replay_only"])
            return None if got is None else Response(claim_reply(*got))

        response = services.runner_claim_wait(
            claim_once=lambda: idempotency.respond(idem, claim_once), wait=data["wait"]
        )
        return response or Response(status=status.HTTP_204_NO_CONTENT)


class HeartbeatView(RunnerView):
    @extend_schema(
        parameters=[LEASE_TOKEN],
        request=HeartbeatSerializer,
        responses={200: HeartbeatReplySerializer, **errors(400, 401, 403, 404, 409)},
        description="The attempt is alive (and, optionally, its slot and metrics). Says whether a cancel "
        "was requested; 409 lease_lost when the attempt is no longer this runner's.",
    )
    def post(self, request, attempt_id: int):
        data = _valid(HeartbeatSerializer, request.data)
        reply = services.runner_heartbeat(
            token=request.auth, attempt_id=attempt_id, lease_token=_lease_token(request), **data
        )
        return Response({"cancel_requested": reply.cancel_requested, "attempt_status": reply.attempt_status})


class EventsView(RunnerView):
    @extend_schema(
        parameters=[IDEMPOTENCY_KEY, LEASE_TOKEN],
        request=EventsSerializer,
        responses={200: EventsReplySerializer, **errors(400, 401, 403, 409, 413, 422)},
        description="Append 1-500 events to the attempt's task, in order (the body within "
        "AGENTRUNNER_MAX_JSON_BODY, else 413; each event is stored bounded: message 2,000 characters, "
        "strings in data 1,000, lists and objects 1,000 entries).",
    )
    def post(self, request, attempt_id: int):
        idem = idempotency.from_request(request)
        data = _valid(EventsSerializer, request.data)
        lease_token = _lease_token(request)

        def effect():
            seqs = services.runner_events(attempt_id=attempt_id, lease_token=lease_token, events=data["events"])
            return Response({"appended": len(seqs), "last_seq": seqs[-1]})

        return idempotency.respond(idem, effect)


class UsageView(RunnerView):
    @extend_schema(
        parameters=[IDEMPOTENCY_KEY, LEASE_TOKEN],
        request=UsageSerializer,
        responses={200: OkSerializer, **errors(400, 401, 403, 409, 422)},
        description="Add one LLM call's usage to the task's totals (`cost_usd` null: unknown cost).",
    )
    def post(self, request, attempt_id: int):
        idem = idempotency.from_request(request)
        data = _valid(UsageSerializer, request.data)
        lease_token = _lease_token(request)

        def effect():
            services.runner_add_usage(attempt_id=attempt_id, lease_token=lease_token, **data)
            return Response({"ok": True})

        return idempotency.respond(idem, effect)


class ArtifactUploadView(RunnerView):
    parser_classes = [RawBodyParser]

    @extend_schema(
        parameters=[
            IDEMPOTENCY_KEY,
            LEASE_TOKEN,
            OpenApiParameter("X-Content-SHA256", OpenApiTypes.STR, OpenApiParameter.HEADER, required=True),
            OpenApiParameter("X-Artifact-Name", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False),
            OpenApiParameter("X-Artifact-Kind", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False),
            OpenApiParameter(
                "X-Artifact-Role",
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                required=False,
                description="Also link the artifact to the task under this role, in the same transaction "
                "(instead of a separate artifact-links/ call). Up to 64 characters [A-Za-z0-9_.:-].",
            ),
            OpenApiParameter(
                "X-Artifact-Metadata",
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                required=False,
                description="A JSON object (at most 2,048 bytes). `attempt`: the attempt the artifact belongs to "
                "(a spooled artifact of an earlier attempt), which must be one of this task's attempts (else "
                "400); `spooled`, `recovered` are kept; other keys are ignored.",
            ),
        ],
        request={"application/octet-stream": OpenApiTypes.BINARY},
        responses={201: UploadReplySerializer, **errors(400, 401, 403, 409, 411, 413, 422, 503, 507)},
        description="Upload an artifact of the attempt as the raw body (streamed; its own Content-Type); "
        "X-Content-SHA256 is checked. With X-Artifact-Role it is linked to the task in the same call; "
        "otherwise link it with artifact-links/.",
    )
    def post(self, request, attempt_id: int):
        sha256 = request.headers.get("X-Content-SHA256", "").strip()
        if not sha256:
            raise DomainError("An upload needs the X-Content-SHA256 header.", field="X-Content-SHA256")
        length = _content_length(request)
        if length < 0:
            return _length_required()
        if length > settings.ARTIFACTS_MAX_SIZE:
            raise ArtifactTooLarge(f"artifact exceeds the maximum size of {settings.ARTIFACTS_MAX_SIZE} bytes")
        name = request.headers.get("X-Artifact-Name", "") or "artifact"
        kind = request.headers.get("X-Artifact-Kind", "") or "other"
        content_type = (request.META.get("CONTENT_TYPE") or "").split(";")[0].strip()
        role = request.headers.get("X-Artifact-Role", "").strip()
        if not ROLE_RE.match(role):
            raise DomainError(
                "X-Artifact-Role must be up to 64 characters of [A-Za-z0-9_.:-].", field="X-Artifact-Role"
            )
        raw_metadata = request.headers.get("X-Artifact-Metadata", "").strip()
        metadata = _artifact_metadata(raw_metadata)
        lease_token = _lease_token(request)
        idem = idempotency.from_request(
            request, body=False, extra=[sha256, name, kind, content_type, str(length), role, raw_metadata]
        )

        def effect():
            artifact = services.runner_upload(
                token=request.auth,
                attempt_id=attempt_id,
                lease_token=lease_token,
                source=_request_chunks(request._request, length),
                name=name,
                kind=kind,
                content_type=content_type,
                expected_sha256=sha256,
                expected_size=length,
                metadata=metadata,
                role=role,
            )
            body = {"id": artifact.pk, "sha256": artifact.sha256, "size": artifact.size}
            return Response({**body, "name": artifact.name, "kind": artifact.kind}, status=201)

        return idempotency.respond_after_io(idem, effect)


class ResultsView(RunnerView):
    parser_classes = [RawBodyParser]

    @extend_schema(
        parameters=[
            IDEMPOTENCY_KEY,
            LEASE_TOKEN,
            OpenApiParameter("X-Result-Branch", OpenApiTypes.STR, OpenApiParameter.HEADER, required=True),
            OpenApiParameter("X-Result-Base", OpenApiTypes.STR, OpenApiParameter.HEADER, required=True),
            OpenApiParameter("X-Content-SHA256", OpenApiTypes.STR, OpenApiParameter.HEADER, required=True),
        ],
        request={"application/x-git-bundle": OpenApiTypes.BINARY},
        responses={200: ResultsReplySerializer, **errors(400, 401, 403, 409, 411, 413, 422)},
        description="The attempt's result branch as a git bundle (`git bundle create - <base>..<branch>`): "
        "fetched into the server's results repository. Answers how to fetch it.",
    )
    def post(self, request, attempt_id: int):
        headers = {name: request.headers.get(name, "").strip() for name in RESULT_HEADERS}
        for name, value in headers.items():
            if not value:
                raise DomainError(f"A results upload needs the {name} header.", field=name)
        length = _content_length(request)
        if length < 0:
            return _length_required()
        lease_token = _lease_token(request)
        idem = idempotency.from_request(request, body=False, extra=[*headers.values(), str(length)])

        def effect():
            fetch, commit = services.runner_results(
                attempt_id=attempt_id,
                lease_token=lease_token,
                source=_request_chunks(request._request, length),
                size=length,
                sha256=headers["X-Content-SHA256"],
                branch=headers["X-Result-Branch"],
                base=headers["X-Result-Base"],
            )
            return Response({"fetch": fetch, "commit": commit})

        return idempotency.respond_after_io(idem, effect)


class ArtifactLinkView(RunnerView):
    @extend_schema(
        parameters=[IDEMPOTENCY_KEY, LEASE_TOKEN],
        request=LinkSerializer,
        responses={201: LinkReplySerializer, **errors(400, 401, 403, 409, 422)},
        description="Link an artifact uploaded by this attempt's task to the task, under `role`.",
    )
    def post(self, request, attempt_id: int):
        idem = idempotency.from_request(request)
        data = _valid(LinkSerializer, request.data)
        lease_token = _lease_token(request)

        def effect():
            services.runner_link_artifact(attempt_id=attempt_id, lease_token=lease_token, **data)
            return Response({"artifact_id": data["artifact_id"], "role": data["role"]}, status=201)

        return idempotency.respond(idem, effect)


class FinishView(RunnerView):
    @extend_schema(
        parameters=[IDEMPOTENCY_KEY, LEASE_TOKEN],
        request=FinishSerializer,
        responses={200: FinishReplySerializer, **errors(400, 401, 403, 409, 422)},
        description="End the attempt with its outcome and result; answers the task's status. A "
        "`result.result_branch` must be the task's own (agent/<short id>, optionally -<suffix>) and a "
        "valid git branch name, else 400 on `result`.",
    )
    def post(self, request, attempt_id: int):
        idem = idempotency.from_request(request)
        data = _valid(FinishSerializer, request.data)
        lease_token = _lease_token(request)

        def effect():
            task = services.runner_finish(attempt_id=attempt_id, lease_token=lease_token, **data)
            return Response({"status": task.status})

        return idempotency.respond(idem, effect)


# --- slots on this runner's host ----------------------------------------------------------------
class SlotAllocateView(RunnerView):
    @extend_schema(
        parameters=[IDEMPOTENCY_KEY],
        request=SlotAllocateSerializer,
        responses={200: SlotAllocateReplySerializer, **errors(400, 401, 403, 404, 409, 422, 503)},
        description="Lease a slot (a working copy) of this runner's registered host for the repository; the "
        "pool grows up to the capacity the host announced. The reply says what to do first: clone (empty "
        "`commit`) or reset (`needs_reset`), then report with prepared/. 503 `no_slot` + Retry-After when "
        "none became free within `wait_seconds`.",
    )
    def post(self, request):
        idem = idempotency.from_request(request)
        data = _valid(SlotAllocateSerializer, request.data)
        lease_token = request.headers.get("X-Lease-Token", "").strip() if data["attempt_id"] else ""
        wait = data.pop("wait_seconds")

        def allocate_once():
            services.runner_token_check_live(token=request.auth)
            grant = services.runner_slot_allocate(token=request.auth, lease_token=lease_token, **data)
            return None if grant is None else Response(slot_grant_reply(grant))

        return services.runner_slot_allocate_wait(
            token=request.auth,
            repository_id=data["repository_id"],
            host=data["host"],
            wait_seconds=wait,
            allocate_once=lambda: idempotency.respond(idem, allocate_once),
        )


class SlotPreparedView(RunnerView):
    @extend_schema(
        parameters=[IDEMPOTENCY_KEY],
        request=SlotPreparedSerializer,
        responses={200: SlotStateReplySerializer, **errors(400, 401, 403, 404, 409, 422)},
        description="The copy is ready at `commit` (fenced by the slot's lease token: 409 stale_lease).",
    )
    def post(self, request, slot_id: int):
        idem = idempotency.from_request(request)
        data = _valid(SlotPreparedSerializer, request.data)

        def effect():
            slot = services.runner_slot_prepared(
                token=request.auth, slot_id=slot_id, lease_token=data.pop("token"), **data
            )
            return Response({"state": slot.state})

        return idempotency.respond(idem, effect)


class SlotRenewView(RunnerView):
    @extend_schema(
        request=SlotRenewSerializer,
        responses={200: SlotRenewReplySerializer, **errors(400, 401, 403, 404, 409)},
        description="Extend the lease (by its allocated length unless `lease_seconds`); 409 stale_lease.",
    )
    def post(self, request, slot_id: int):
        data = _valid(SlotRenewSerializer, request.data)
        expires = services.runner_slot_renew(
            token=request.auth, slot_id=slot_id, lease_token=data["token"], lease_seconds=data["lease_seconds"]
        )
        return Response(SlotRenewReplySerializer({"expires_at": expires}).data)


class SlotReleaseView(RunnerView):
    @extend_schema(
        parameters=[IDEMPOTENCY_KEY],
        request=SlotReleaseSerializer,
        responses={200: SlotStateReplySerializer, **errors(400, 401, 403, 404, 409, 422)},
        description="The host reset its copy (free again at `commit`) or could not (`broken_reason`: broken).",
    )
    def post(self, request, slot_id: int):
        idem = idempotency.from_request(request)
        data = _valid(SlotReleaseSerializer, request.data)

        def effect():
            slot = services.runner_slot_release(
                token=request.auth, slot_id=slot_id, lease_token=data.pop("token"), **data
            )
            return Response({"state": slot.state})

        return idempotency.respond(idem, effect)
