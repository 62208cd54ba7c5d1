from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from common.drf import errors
from common.permissions import IsStaff, is_staff
from repopool import services
from repopool.models import Repository, Slot, SlotState
from repopool.serializers import (
    AllocateSerializer,
    LeaseSerializer,
    RenewSerializer,
    RepositoryPublicSerializer,
    RepositorySerializer,
    SlotSerializer,
    TokenSerializer,
    WarmRequestSerializer,
)


class RepositoryViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    """Staff define repositories (what runs on the hosts); any user may list them, to submit tasks,
    and sees only what a submitter needs: no URLs (they may carry credentials), no commands but
    the test command."""

    queryset = Repository.objects.all().prefetch_related("slots")
    serializer_class = RepositorySerializer

    def get_permissions(self):
        if self.action in ("list", "retrieve"):
            return super().get_permissions()
        return [IsStaff()]

    def get_serializer_class(self):
        if self.action in ("list", "retrieve") and not is_staff(self.request.user):
            return RepositoryPublicSerializer
        return RepositorySerializer

    @extend_schema(responses={201: RepositorySerializer, **errors(400, 401, 403, 413, 415)})
    def create(self, request, *args, **kwargs):
        data = RepositorySerializer(data=request.data)
        data.is_valid(raise_exception=True)
        repo = services.repository_create(**data.validated_data)
        return Response(RepositorySerializer(repo).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={200: RepositorySerializer(many=True), **errors(401, 403, 404)})
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(responses={200: RepositorySerializer, **errors(401, 403, 404)})
    def retrieve(self, request, *args, **kwargs):
        return super().retrieve(request, *args, **kwargs)

    @extend_schema(responses={200: RepositorySerializer, **errors(400, 401, 403, 404, 413, 415)})
    def update(self, request, *args, **kwargs):
        return super().update(request, *args, **kwargs)

    @extend_schema(responses={200: RepositorySerializer, **errors(400, 401, 403, 404, 413, 415)})
    def partial_update(self, request, *args, **kwargs):
        return super().partial_update(request, *args, **kwargs)

    def perform_update(self, serializer):
        services.repository_update(repository=serializer.instance, **serializer.validated_data)

    @extend_schema(
        request=None,
        responses={202: WarmRequestSerializer, **errors(401, 403, 404)},
        description="Ask a worker to bring the pool up to its size (clone, set up, repair broken slots). "
        "Nothing runs in the request: poll the repository's `slots` counts to follow the progress.",
    )
    @action(detail=True, methods=["post"])
    def warm(self, request, pk=None):
        repo = services.pool_warm_request(repository=self.get_object())
        body = {"repository": repo.name, "warm_requested_at": repo.warm_requested_at, "slots": repo.slot_counts()}
        return Response(WarmRequestSerializer(body).data, status=status.HTTP_202_ACCEPTED)


class SlotFilterSerializer(serializers.Serializer):
    repository = serializers.RegexField(
        services.REPOSITORY_REF_REGEX,
        required=False,
        help_text="Repository id or name.",
        error_messages={"invalid": services.REPOSITORY_REF_HELP},
    )
    state = serializers.ChoiceField(choices=SlotState.choices, required=False)


class SlotViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Slots and leases are for staff (and, with remote runners, runner tokens): a plain user who
    could lease slots could starve everyone's tasks."""

    serializer_class = SlotSerializer
    permission_classes = [IsStaff]

    def get_queryset(self):
        queryset = Slot.objects.select_related("repository")
        if self.action == "list":
            query = SlotFilterSerializer(data=self.request.query_params)
            query.is_valid(raise_exception=True)
            if query.validated_data.get("repository"):
                queryset = queryset.filter(repository=services.repository_get(ref=query.validated_data["repository"]))
            if query.validated_data.get("state"):
                queryset = queryset.filter(state=query.validated_data["state"])
        return queryset

    @extend_schema(
        parameters=[SlotFilterSerializer], responses={200: SlotSerializer(many=True), **errors(400, 401, 403, 404)}
    )
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(responses={200: SlotSerializer, **errors(401, 403, 404)})
    def retrieve(self, request, *args, **kwargs):
        return super().retrieve(request, *args, **kwargs)

    @extend_schema(
        request=AllocateSerializer, responses={201: LeaseSerializer, **errors(400, 401, 403, 404, 413, 415, 503)}
    )
    @action(detail=False, methods=["post"])
    def allocate(self, request):
        data = AllocateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        params = data.validated_data
        lease = services.slot_allocate(
            repository=services.repository_get(ref=params["repository"]),
            holder=params["holder"],
            lease_seconds=params["lease_seconds"],
            wait_seconds=params["wait_seconds"],
            ref=params["ref"],
        )
        body = {
            "id": lease.slot_id,
            "path": str(lease.path),
            "lease_token": lease.lease_token,
            "lease_expires_at": lease.lease_expires_at,
            "commit": lease.commit,
        }
        return Response(LeaseSerializer(body).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=RenewSerializer, responses={200: SlotSerializer, **errors(400, 401, 403, 404, 409, 413, 415)}
    )
    @action(detail=True, methods=["post"])
    def renew(self, request, pk=None):
        data = RenewSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        slot = self.get_object()
        services.slot_renew(slot_id=slot.pk, **data.validated_data)
        slot.refresh_from_db()
        return Response(SlotSerializer(slot).data)

    @extend_schema(
        request=TokenSerializer, responses={200: SlotSerializer, **errors(400, 401, 403, 404, 409, 413, 415)}
    )
    @action(detail=True, methods=["post"])
    def release(self, request, pk=None):
        data = TokenSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        slot = services.slot_release(slot_id=self.get_object().pk, lease_token=data.validated_data["lease_token"])
        return Response(SlotSerializer(slot).data)
