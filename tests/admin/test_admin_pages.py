"""The admin pages as a staff member sees them, rendered by the Django test client."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from artifacts import services as artifact_services
from artifacts.models import Artifact
from registry import services
from registry.models import Attempt, Task, TaskEvent
from repopool import services as pool_services
from repopool.models import Repository, Slot
from tests.conftest import run_git

pytestmark = pytest.mark.django_db

SUBMIT_CONTROLS = ('name="_save"', 'name="_continue"', 'name="_addanother"', 'class="deletelink"')


@pytest.fixture
def staff(db):
    user = get_user_model().objects.create_user(username="ops", password="pw-ops-123", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    return client


def finished_task(repository, *, title: str, status: str, failure_reason: str = "", seconds: int = 75) -> Task:
    task = services.task_create(title=title, instructions="i", repository=repository)
    task, attempt = services.task_claim(runner_id="runner-1", task_id=task.pk)
    services.event_append(task_id=task.pk, type="progress", message="halfway there")
    services.task_finish(task_id=task.pk, attempt_id=attempt.pk, status=status, failure_reason=failure_reason)
    started = timezone.now() - timedelta(seconds=seconds)
    Task.objects.filter(pk=task.pk).update(started_at=started, finished_at=started + timedelta(seconds=seconds))
    return Task.objects.get(pk=task.pk)


def format_patch(make_repo) -> str:
    """A real git format-patch mail: a commit message with '- item' lines, a removed line that
    starts with '--', and the '-- ' signature followed by the git version."""
    origin = make_repo({"notes.txt": "keep\n-- old dashes\nlast\n"})
    (origin / "notes.txt").write_text("keep\nnew line\nlast\n")
    run_git(origin, "commit", "-qam", "Tidy notes\n\n- drop the dashes\n- add a line")
    return run_git(origin, "format-patch", "-1", "--stdout") + "\n"


def assert_read_only(page: str) -> None:
    for control in SUBMIT_CONTROLS:
        assert control not in page, control
    assert 'class="closelink"' in page  # Django's view-only page: a Close link, nothing to submit


def test_read_only_pages_show_no_edit_controls(staff, repository, make_repo):
    task = finished_task(repository, title="inspect me", status="succeeded")
    attempt = Attempt.objects.get(task=task)
    event = TaskEvent.objects.filter(task=task).first()
    artifact = artifact_services.artifact_store(source=b"log line\n", name="run.log", kind="log")
    pool_services.pool_warm(repository=repository)
    slot = Slot.objects.first()
    for url in [
        f"/admin/registry/task/{task.pk}/change/",
        f"/admin/registry/attempt/{attempt.pk}/change/",
        f"/admin/registry/taskevent/{event.pk}/change/",
        f"/admin/artifacts/artifact/{artifact.pk}/change/",
        f"/admin/repopool/slot/{slot.pk}/change/",
    ]:
        response = staff.get(url)
        assert response.status_code == 200, url
        assert_read_only(response.content.decode())
    # The repository is the one editable model: its page keeps Save (and no Delete: tasks keep it).
    page = staff.get(f"/admin/repopool/repository/{repository.pk}/change/").content.decode()
    assert 'name="_save"' in page and 'class="deletelink"' not in page


@pytest.mark.parametrize(
    "url",
    ["/admin/registry/task/{task}/delete/", "/admin/registry/attempt/{attempt}/delete/"],
)
def test_nothing_is_deleted_behind_the_services(staff, repository, url):
    task = finished_task(repository, title="keep me", status="failed", failure_reason="tests_failed")
    attempt = Attempt.objects.get(task=task)
    target = url.format(task=task.pk, attempt=attempt.pk)
    assert staff.post(target, {"post": "yes"}).status_code == 403
    listing = staff.post("/admin/registry/task/", {"action": "delete_selected", "_selected_action": [str(task.pk)]})
    assert listing.status_code in (200, 302)
    assert Task.objects.filter(pk=task.pk).exists() and Attempt.objects.filter(pk=attempt.pk).exists()


def test_task_list_has_badges_duration_seconds_cost_and_few_columns(staff, repository):
    done = finished_task(repository, title="all green", status="succeeded", seconds=75)
    Task.objects.filter(pk=done.pk).update(cost_usd="0.012345")
    finished_task(repository, title="all red", status="failed", failure_reason="tests_failed", seconds=3725)
    services.task_create(title="waiting", instructions="i", repository=repository)
    page = staff.get("/admin/registry/task/").content.decode()
    assert '<span class="badge badge-succeeded"' in page
    assert '<span class="badge badge-failed" title="tests_failed' in page and "Tests Failed" in page
    assert '<span class="badge badge-queued"' in page
    assert ".badge-succeeded {" in page  # the style ships with the page
    assert "1m 15s" in page and "1h 02m 05s" in page
    assert "$0.0123" in page
    finished = timezone.localtime(Task.objects.get(pk=done.pk).finished_at).strftime("%Y-%m-%d<br>%H:%M:%S")
    assert finished in page  # to the second (date above time)
    headers = re.findall(r'<th scope="col" class="([^"]*)"', page)
    assert len(headers) <= 9, headers  # the selection box and eight columns
    assert any("column-cost" in h for h in headers) and any("column-finished" in h for h in headers)
    assert any("column-duration" in h for h in headers)


def test_admin_actions_still_go_through_the_services(staff, repository):
    queued = services.task_create(title="to cancel", instructions="i", repository=repository)
    response = staff.post(
        "/admin/registry/task/", {"action": "cancel_tasks", "_selected_action": [str(queued.pk)]}, follow=True
    )
    assert response.status_code == 200
    task = Task.objects.get(pk=queued.pk)
    assert task.status == "cancelled"
    assert TaskEvent.objects.filter(task=task, type="status", data__to="cancelled").exists()  # the service's event


def test_artifact_page_links_to_its_tasks(staff, repository):
    first = finished_task(repository, title="first task", status="succeeded")
    second = finished_task(repository, title="second task", status="failed", failure_reason="tests_failed")
    artifact = artifact_services.artifact_store(source=b"shared\n", name="notes.txt", kind="log")
    services.task_link_artifact(task_id=first.pk, artifact_id=artifact.pk, role="log", attempt_number=1)
    services.task_link_artifact(task_id=second.pk, artifact_id=artifact.pk, role="report")
    page = staff.get(f"/admin/artifacts/artifact/{artifact.pk}/change/").content.decode()
    assert f'<a href="/admin/registry/task/{first.pk}/change/">first task</a> (log, attempt 1)' in page
    assert f'<a href="/admin/registry/task/{second.pk}/change/">second task</a> (report)' in page
    lone = artifact_services.artifact_store(source=b"alone\n", name="lone.txt", kind="log")
    assert "not linked to a task" in staff.get(f"/admin/artifacts/artifact/{lone.pk}/change/").content.decode()


def test_patch_view_colours_only_lines_inside_hunks(staff, make_repo):
    from artifacts.admin import ADDED, HEADER, HUNK, PLAIN, REMOVED, patch_line_colors

    text = format_patch(make_repo)
    colors = dict((line, color) for color, line in patch_line_colors(text))
    assert colors["-- "] == PLAIN  # the mail's signature, followed by the git version
    assert colors["- drop the dashes"] == PLAIN and colors["- add a line"] == PLAIN  # the commit message
    assert colors["--- old dashes"] == REMOVED  # a removed line that itself starts with "--"
    assert colors["+new line"] == ADDED
    assert colors[" keep"] == PLAIN and colors[" last"] == PLAIN
    assert colors["--- a/notes.txt"] == HEADER and colors["+++ b/notes.txt"] == HEADER
    assert [line for line in colors if colors[line] == HUNK] == [line for line in colors if line.startswith("@@")]
    artifact = artifact_services.artifact_store(source=text.encode(), name="fix.patch", kind="patch")
    page = staff.get(f"/admin/artifacts/artifact/{artifact.pk}/change/").content.decode()
    assert f'<div style="min-height:1.2em;background:{PLAIN}">-- </div>' in page
    assert f'<div style="min-height:1.2em;background:{REMOVED}">--- old dashes</div>' in page


def test_patch_colours_handle_counts_new_files_and_no_newline_markers():
    from artifacts.admin import ADDED, HEADER, HUNK, PLAIN, patch_line_colors

    text = (
        "diff --git a/new.txt b/new.txt\nnew file mode 100644\n--- /dev/null\n+++ b/new.txt\n"
        "@@ -0,0 +1 @@\n+only line\n\\ No newline at end of file\n-- \n2.43.0\n"
    )
    rows = list(patch_line_colors(text))
    assert rows == [
        (HEADER, "diff --git a/new.txt b/new.txt"),
        (HEADER, "new file mode 100644"),
        (HEADER, "--- /dev/null"),
        (HEADER, "+++ b/new.txt"),
        (HUNK, "@@ -0,0 +1 @@"),
        (ADDED, "+only line"),
        (PLAIN, "\\ No newline at end of file"),
        (PLAIN, "-- "),
        (PLAIN, "2.43.0"),
    ]


def test_repository_edits_in_the_admin_go_through_the_service(staff, repository, make_repo):
    url = f"/admin/repopool/repository/{repository.pk}/change/"
    form = {
        "name": repository.name,
        "url": "/nonexistent/not-a-repo",
        "default_branch": "main",
        "pool_size": 3,
        "setup_command": "",
        "setup_watch_files": "[]",
        "test_command": repository.test_command,
        "keep_paths": "[]",
        "push_url": "",
        "setup_network": "on",
    }
    refused = staff.post(url, form)
    assert refused.status_code == 200  # the form again, with the reason, not a 500
    assert "is not a reachable git repository" in refused.content.decode()
    assert Repository.objects.get(pk=repository.pk).pool_size == 2
    other = make_repo(name="elsewhere")
    saved = staff.post(url, {**form, "url": str(other)})
    assert saved.status_code == 302, saved.content.decode()[:2000]
    repository.refresh_from_db()
    assert repository.url == str(other) and repository.pool_size == 3


def test_admin_is_for_staff_only(repository, user):
    client = Client()
    assert client.get("/admin/registry/task/").status_code == 302  # to the login page
    client.force_login(user)  # an API user who is not staff
    response = client.get("/admin/registry/task/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert Artifact.objects.count() == 0


def test_slot_list_shows_lease_expiry_to_the_second(staff, repository):
    lease = pool_services.slot_allocate(repository=repository, holder="runner-9", lease_seconds=600)
    page = staff.get("/admin/repopool/slot/").content.decode()
    expires = timezone.localtime(Slot.objects.get(pk=lease.slot_id).lease_expires_at)
    assert expires.strftime("%Y-%m-%d %H:%M:%S") in page and "runner-9" in page
