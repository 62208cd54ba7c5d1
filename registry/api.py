from __future__ import annotations

from django.db.models import F
from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from common.drf import Pagination, SharedFields, errors
from registry import services
from registry.models import Task, TaskEvent
from registry.selectors import tasks_visible_to
from registry.serializers import (
    AttemptSerializer,
    TaskArtifactSerializer,
    TaskCreateSerializer,
    TaskDependenciesSerializer,
    TaskEventSerializer,
    TaskSerializer,
    attach_dependency_ids,
)
from registry.states import TaskStatus
from repopool.models import Repository
from repopool.services import REPOSITORY_REF_HELP, REPOSITORY_REF_REGEX

UUID_REGEX = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"


class TaskFilterSerializer(SharedFields, serializers.Serializer):
    status = serializers.ChoiceField(choices=TaskStatus.choices, required=False)
    repository = serializers.RegexField(
        REPOSITORY_REF_REGEX,
        required=False,
        help_text="Repository id or name.",
        error_messages={"invalid": REPOSITORY_REF_HELP},
    )


class EventsQuerySerializer(SharedFields, serializers.Serializer):
    after = serializers.IntegerField(
        required=False, min_value=0, default=0, help_text="Only events with a larger sequence number."
    )
    limit = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=1000,
        default=500,
        help_text="Without cursor: at most this many events (a list). With cursor, use page_size.",
    )


class TaskPagination(Pagination):
    cursor_ordering = ("-created_at", "-id")  # the index task_list_order


class EventPagination(Pagination):
    cursor_ordering = ("seq",)  # oldest first; with the task's id, the unique index event_unique_seq


class TaskEventPageSerializer(serializers.Serializer):
    """A cursor page of a task's events (schema only)."""

    count = serializers.IntegerField(required=False, help_text="Only with count=exact.")
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = TaskEventSerializer(many=True)


class TaskViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = TaskSerializer
    pagination_class = TaskPagination
    lookup_value_regex = UUID_REGEX

    def get_queryset(self):
        if self.action not in ("list", "retrieve"):
            # The other actions need the task's id only (and who may see it).
            return tasks_visible_to(self.request.user, Task.objects.only("id", "owner_id"))
        # The names the serializer shows, joined in, rather than whole repository and user rows.
        queryset = tasks_visible_to(
            self.request.user,
            Task.objects.annotate(repository_name=F("repository__name"), owner_username=F("owner__username")),
        )
        if self.action == "list":
            query = TaskFilterSerializer(data=self.request.query_params)
            query.is_valid(raise_exception=True)
            if "status" in query.validated_data:
                queryset = queryset.filter(status=query.validated_data["status"])
            repo = query.validated_data.get("repository")
            if repo:
                repo_ids = Repository.objects.filter(name=repo).values_list("pk", flat=True)
                if repo.isascii() and repo.isdigit():  # the field allows only ASCII digits anyway
                    repo_ids = [int(repo), *repo_ids]
                queryset = queryset.filter(repository_id__in=list(repo_ids))
        return queryset

    @extend_schema(
        parameters=[TaskFilterSerializer], responses={200: TaskSerializer(many=True), **errors(400, 401, 403, 404)}
    )
    def list(self, request, *args, **kwargs):
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        attach_dependency_ids(page)
        return self.get_paginated_response(TaskSerializer(page, many=True).data)

    @extend_schema(responses={200: TaskSerializer, **errors(401, 403, 404)})
    def retrieve(self, request, *args, **kwargs):
        return super().retrieve(request, *args, **kwargs)

    @extend_schema(request=TaskCreateSerializer, responses={201: TaskSerializer, **errors(400, 401, 403, 413, 415)})
    def create(self, request):
        data = TaskCreateSerializer(data=request.data, context={"request": request})
        data.is_valid(raise_exception=True)
        task = services.task_create(**data.validated_data, owner=request.user)
        return Response(TaskSerializer(task).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: TaskSerializer, **errors(401, 403, 404, 409)})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        task = services.task_cancel(task_id=self.get_object().pk)
        return Response(TaskSerializer(task).data)

    @extend_schema(request=None, responses={200: TaskSerializer, **errors(401, 403, 404, 409)})
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        task = services.task_retry(task_id=self.get_object().pk)
        return Response(TaskSerializer(task).data)

    @extend_schema(
        request=TaskDependenciesSerializer, responses={200: TaskSerializer, **errors(400, 401, 403, 404, 409, 413, 415)}
    )
    @action(detail=True, methods=["put"], url_path="dependencies")
    def dependencies(self, request, pk=None):
        task = self.get_object()
        data = TaskDependenciesSerializer(data=request.data, context={"request": request})
        data.is_valid(raise_exception=True)
        task = services.task_set_dependencies(task_id=task.pk, depends_on=data.validated_data["depends_on"])
        return Response(TaskSerializer(task).data)

    @extend_schema(
        parameters=[EventsQuerySerializer, *EventPagination().get_cursor_parameters()],
        responses={
            200: PolymorphicProxySerializer(
                component_name="TaskEvents",
                serializers=[TaskEventSerializer(many=True), TaskEventPageSerializer],
                resource_type_field_name=None,
                many=False,  # the list is one of the two shapes, not a list of them
            ),
            **errors(400, 401, 403, 404),
        },
        description="Events after sequence number `after`, oldest first; poll with the last seq seen to tail a "
        "task. Without `cursor`: a list of at most `limit` events. With `cursor` (empty for the first page, "
        "then the `next` or `previous` link): a page `{next, previous, results}` of `page_size` events (50 "
        "unless given, at most 500), each page as cheap however many events the task has; `count` only with "
        "`count=exact`.",
    )
    @action(detail=True, methods=["get"], pagination_class=None)
    def events(self, request, pk=None):
        task = self.get_object()
        query = EventsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        events = TaskEvent.objects.filter(task_id=task.pk, seq__gt=query.validated_data["after"])
        if "cursor" in request.query_params:
            if "limit" in request.query_params:
                raise serializers.ValidationError({"limit": ["With cursor, give page_size (events a page) instead."]})
            pages = EventPagination()
            page = pages.paginate_queryset(events, request, view=self)
            return pages.get_paginated_response(TaskEventSerializer(page, many=True).data)
        events = events.order_by("seq")[: query.validated_data["limit"]]
        return Response(TaskEventSerializer(events, many=True).data)

    @extend_schema(responses={200: AttemptSerializer(many=True), **errors(401, 403, 404)})
    @action(detail=True, methods=["get"], pagination_class=None)
    def attempts(self, request, pk=None):
        return Response(AttemptSerializer(self.get_object().attempts.order_by("number"), many=True).data)

    @extend_schema(responses={200: TaskArtifactSerializer(many=True), **errors(401, 403, 404)})
    @action(detail=True, methods=["get"], pagination_class=None)
    def artifacts(self, request, pk=None):
        links = self.get_object().artifact_links.select_related("artifact").order_by("created_at")
        return Response(TaskArtifactSerializer(links, many=True).data)
