from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from registry import services
from registry.models import Task

pytestmark = pytest.mark.django_db


def test_admin_shows_task_with_events_and_attempts_and_actions_use_services(staff_api, repository):
    from django.test import Client

    task = services.task_create(title="inspect me", instructions="i", repository=repository)
    services.task_claim(runner_id="runner-admin")
    services.event_append(task_id=task.pk, type="progress", message="halfway there")
    client = Client()
    client.force_login(staff_api.user)
    listing = client.get("/admin/registry/task/", {"status__exact": "running"})
    assert listing.status_code == 200 and "inspect me" in listing.content.decode()
    page = client.get(f"/admin/registry/task/{task.pk}/change/").content.decode()
    assert "halfway there" in page and "runner-admin" in page
    queued = services.task_create(title="to cancel", instructions="i", repository=repository)
    response = client.post(
        "/admin/registry/task/", {"action": "cancel_tasks", "_selected_action": [str(queued.pk)]}, follow=True
    )
    assert response.status_code == 200
    assert Task.objects.get(pk=queued.pk).status == "cancelled"
    assert client.get("/admin/repopool/repository/").status_code == 200


def test_create_api_token_command_prints_a_working_token(repository):
    out = io.StringIO()
    call_command("create_api_token", "bob", stdout=out, stderr=io.StringIO())
    key = out.getvalue().strip()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/tasks/").status_code == 200
    again = io.StringIO()
    call_command("create_api_token", "bob", stdout=again, stderr=io.StringIO())
    assert again.getvalue().strip() == key
