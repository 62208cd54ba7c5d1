"""The inspector's pages over real runs (real pipeline, replayed model), per role."""

from __future__ import annotations

import re
import uuid

import pytest
from django.test import Client

from registry import services as registry
from registry.models import Task

pytestmark = pytest.mark.django_db(transaction=True)


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def text_of(html: bytes) -> str:
    """What a reader sees: tags dropped, entities of the few characters we escape restored."""
    text = re.sub(r"<[^>]+>", "", html.decode())
    return (
        text.replace("&quot;", '"')
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
    )


def test_pages_need_a_login_and_a_plain_user_can_sign_in(alice):
    anonymous = Client()
    for url in ("/runs/", "/runs/dashboard/", f"/runs/{uuid.UUID(int=0)}/"):
        response = anonymous.get(url)
        assert response.status_code == 302 and response.url.startswith("/accounts/login/?next="), url
    # The admin's login admits staff only; the inspector's own form admits every active user.
    response = anonymous.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123"})
    assert response.status_code == 302 and response.url == "/runs/"
    assert anonymous.get("/runs/").status_code == 200
    bad = Client().post("/accounts/login/", {"username": "alice", "password": "wrong"})
    assert bad.status_code == 200 and b"did not match" in bad.content


def test_list_shows_own_runs_with_badges_and_filters(succeeded_run, failed_run, alice, bob, staff):
    page = client_for(alice).get("/runs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert f'data-id="{succeeded_run.pk}" data-status="succeeded"' in html
    assert f'data-id="{failed_run.pk}" data-status="failed"' in html
    assert 'class="badge status-succeeded"' in html and 'class="badge status-failed"' in html
    assert "tests failed" in html  # the failure reason in words
    assert "4,740" in html  # tokens of the replayed conversation

    failed_only = client_for(alice).get("/runs/?status=failed").content.decode()
    assert str(failed_run.pk) in failed_only and str(succeeded_run.pk) not in failed_only
    by_repo = client_for(alice).get("/runs/?repository=broken-tests").content.decode()
    assert str(failed_run.pk) in by_repo and str(succeeded_run.pk) not in by_repo
    by_text = client_for(alice).get(f"/runs/?q={succeeded_run.pk}").content.decode()
    assert str(succeeded_run.pk) in by_text and str(failed_run.pk) not in by_text
    # A filter value outside the vocabulary is ignored, not an error.
    assert client_for(alice).get("/runs/?status=bogus&page=999").status_code == 200

    assert str(succeeded_run.pk) not in client_for(bob).get("/runs/").content.decode()
    staff_page = client_for(staff).get("/runs/?owner=alice").content.decode()
    assert str(succeeded_run.pk) in staff_page and str(failed_run.pk) in staff_page


def test_run_page_shows_timeline_diff_transcript_and_tests(succeeded_run, alice):
    response = client_for(alice).get(f"/runs/{succeeded_run.pk}/")
    assert response.status_code == 200
    html = response.content.decode()
    text = text_of(response.content)
    for phase in ("allocate", "prepare", "agent", "tests", "commit", "artifacts"):
        assert f'class="seg phase-{phase}"' in html, phase
    assert "The model:" in text and "in 4 calls" in text
    assert '<tr class="diff-line add">' in html and '<tr class="diff-line del">' in html
    assert "return a + b" in text and "return a - b" in text
    diff_section = html.split('id="diff"')[1].split('id="tests"')[0]
    assert "2.39" not in diff_section  # format-patch's signature is not a diff line
    for tool in ("read_file", "edit_file", "run_tests", "finish"):
        assert f'<span class="tool-name">{tool}</span>' in html, tool
    assert "4 steps" in text and "900+60 tokens" in text
    assert "2 passed in 0.01s" in text and "exit code 0" in text
    assert succeeded_run.result_fetch in text
    assert 'id="cancel-btn"' not in html and 'id="retry-btn"' not in html  # finished and succeeded: neither


def test_failed_run_page_marks_the_failing_tests_and_offers_retry(failed_run, alice):
    html = client_for(alice).get(f"/runs/{failed_run.pk}/").content.decode()
    assert "Tests failed</strong>: the tests still fail" in html
    assert 'id="first-failure">FAILED test_calc.py::test_add' in html
    assert "exit code 1" in html
    assert 'id="retry-btn"' in html and 'id="cancel-btn"' not in html


def test_another_users_run_is_not_found(succeeded_run, bob):
    client = client_for(bob)
    client.raise_request_exception = False
    for url in (f"/runs/{succeeded_run.pk}/", f"/runs/{succeeded_run.pk}/events/"):
        assert client.get(url).status_code == 404, url
    assert client.post(f"/runs/{succeeded_run.pk}/retry/").status_code == 404
    assert client.get("/runs/not-a-uuid/").status_code == 404


def test_events_json_follows_after_and_reports_status(succeeded_run, alice):
    client = client_for(alice)
    everything = client.get(f"/runs/{succeeded_run.pk}/events/").json()
    seqs = [e["seq"] for e in everything["events"]]
    assert seqs == sorted(seqs) and len(seqs) == succeeded_run.event_seq
    later = client.get(f"/runs/{succeeded_run.pk}/events/?after={seqs[-3]}").json()
    assert [e["seq"] for e in later["events"]] == seqs[-2:]
    assert later["status"] == "succeeded" and later["active"] is False
    assert client.get(f"/runs/{succeeded_run.pk}/events/?after=junk").status_code == 200


def test_cancel_and_retry_need_csrf_and_report_refusals(tmp_path, alice, failed_run):
    from tests.inspector.runs import demo_repository

    queued = registry.task_create(
        title="Waits", instructions="x", repository=demo_repository(tmp_path, name="q"), owner=alice
    )
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    assert strict.post(f"/runs/{queued.pk}/cancel/").status_code == 403  # no CSRF token
    page = strict.get(f"/runs/{queued.pk}/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode()).group(1)
    response = strict.post(f"/runs/{queued.pk}/cancel/", {"csrfmiddlewaretoken": token}, follow=True)
    assert response.status_code == 200
    assert Task.objects.get(pk=queued.pk).status == "cancelled"
    assert 'id="run-status">cancelled' in response.content.decode()

    response = strict.post(f"/runs/{failed_run.pk}/retry/", {"csrfmiddlewaretoken": token}, follow=True)
    assert Task.objects.get(pk=failed_run.pk).status in ("pending", "queued")
    assert "Sent back to the queue." in response.content.decode()
    # A refused action (cancelling a cancelled task) is a message on the page, not an error.
    response = strict.post(f"/runs/{queued.pk}/cancel/", {"csrfmiddlewaretoken": token}, follow=True)
    assert response.status_code == 200 and "cannot cancel a cancelled task" in response.content.decode()
    assert strict.get(f"/runs/{failed_run.pk}/cancel/").status_code == 405


def test_dashboard_counts_and_charts(succeeded_run, failed_run, alice, bob, staff):
    html = client_for(alice).get("/runs/dashboard/").content.decode()
    assert '<b id="queue-depth">0</b>' in html
    assert "tests failed</a> 1" in html  # failed in the last hour, by reason
    assert html.count('class="bar cost"') == 14 and "gpt-4o-mini" in html
    assert "Slots per repository" not in html  # the pool is staff's business
    assert "Slots per repository" in client_for(staff).get("/runs/dashboard/").content.decode()
    empty = client_for(bob).get("/runs/dashboard/").content.decode()
    assert "tests failed</a>" not in empty and "No runs yet." in empty


def test_admin_links_each_task_to_its_run_page(succeeded_run, staff):
    staff.is_superuser = True
    staff.save()
    html = client_for(staff).get("/admin/registry/task/").content.decode()
    assert f'href="/runs/{succeeded_run.pk}/"' in html


def test_a_blob_missing_from_storage_is_reported_not_a_500(succeeded_run, alice, settings):
    from pathlib import Path

    link = succeeded_run.artifact_links.select_related("artifact").get(role="transcript")
    root = Path(settings.STORAGES["artifacts"]["OPTIONS"]["location"])
    (root / link.artifact.storage_key).unlink()
    response = client_for(alice).get(f"/runs/{succeeded_run.pk}/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="unreadable"' in html and "transcript: FileNotFoundError" in html
    assert '<tr class="diff-line add">' in html  # the rest of the page is still there
