from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from repopool.models import Repository, Slot

pytestmark = pytest.mark.django_db


def test_repository_crud_warm_and_slot_listing(staff_api, make_repo):
    api = staff_api
    origin = make_repo()
    created = api.post(
        "/api/repositories/",
        {"name": "proj", "url": str(origin), "pool_size": 2, "keep_paths": [".venv"]},
        format="json",
    )
    assert created.status_code == 201, created.json()
    repo = created.json()
    assert repo["default_branch"] == "main"  # read from the repository
    assert api.get("/api/repositories/").json()["count"] == 1
    patched = api.patch(f"/api/repositories/{repo['id']}/", {"pool_size": 1}, format="json")
    assert patched.status_code == 200 and patched.json()["pool_size"] == 1
    warmed = api.post(f"/api/repositories/{repo['id']}/warm/")
    # Warming runs the setup command: queued for a worker, never run in the request.
    assert warmed.status_code == 202 and warmed.json()["slots"] == {}
    assert Slot.objects.count() == 0
    out = io.StringIO()
    call_command("warm_pool", "--pending", stdout=out)
    assert "warmed 1 repository" in out.getvalue()
    slots = api.get("/api/slots/", {"repository": "proj", "state": "free"}).json()
    assert slots["count"] == 1
    assert api.get("/api/slots/", {"state": "leased"}).json()["count"] == 0
    assert api.get(f"/api/slots/{slots['results'][0]['id']}/").json()["repository"] == "proj"
    assert api.get(f"/api/repositories/{repo['id']}/").json()["slots"] == {"free": 1}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "../evil", "url": "x"}, "name"),
        ({"name": "a b", "url": "x"}, "name"),
        ({"name": "ok", "url": "/definitely/not/a/repo"}, "url"),
        ({"name": "ok", "url": "u", "pool_size": 0}, "pool_size"),
        ({"name": "ok", "url": "u", "keep_paths": ["../outside"]}, "keep_paths"),
        ({"name": "ok", "url": "u", "keep_paths": "notalist"}, "keep_paths"),
    ],
)
def test_repository_bad_input(staff_api, body, field):
    response = staff_api.post("/api/repositories/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]
    assert Repository.objects.count() == 0


def test_allocate_renew_release_over_http(staff_api, repository):
    api = staff_api
    lease = api.post(
        "/api/slots/allocate/", {"repository": "sample", "holder": "curl", "lease_seconds": 60}, format="json"
    )
    assert lease.status_code == 201, lease.json()
    body = lease.json()
    assert set(body) == {"id", "path", "lease_token", "lease_expires_at", "commit"}
    renewed = api.post(
        f"/api/slots/{body['id']}/renew/", {"lease_token": body["lease_token"], "lease_seconds": 120}, format="json"
    )
    assert renewed.status_code == 200 and renewed.json()["state"] == "leased"
    stale = api.post(f"/api/slots/{body['id']}/release/", {"lease_token": str(uuid.uuid4())}, format="json")
    assert stale.status_code == 409 and stale.json()["code"] == "stale_lease"
    assert Slot.objects.get(pk=body["id"]).state == "leased"
    missing = api.post(f"/api/slots/{body['id']}/release/", {}, format="json")
    assert missing.status_code == 400 and "lease_token" in missing.json()["errors"]
    released = api.post(f"/api/slots/{body['id']}/release/", {"lease_token": body["lease_token"]}, format="json")
    assert released.status_code == 200 and released.json()["state"] == "free"


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"repository": "nope", "holder": "h"}, 404, "repository"),
        ({"repository": "sample", "holder": "h", "lease_seconds": -1}, 400, "lease_seconds"),
        ({"repository": "sample", "holder": "h", "lease_seconds": 10**9}, 400, "lease_seconds"),
        ({"repository": "sample"}, 400, "holder"),
        ({"repository": "sample", "holder": "h", "ref": "no-such-ref"}, 400, "ref"),
    ],
)
def test_allocate_bad_input(staff_api, repository, body, status, field):
    response = staff_api.post("/api/slots/allocate/", body, format="json")
    assert response.status_code == status, response.content
    assert field in response.json().get("errors", {}), response.json()
    assert not Slot.objects.filter(state="leased").exists()


def test_allocate_exhausted_pool_is_503_with_retry_after(staff_api, make_repo):
    api = staff_api
    from repopool.services import repository_create

    repository_create(name="tiny", url=str(make_repo()), pool_size=1)
    body = {"repository": "tiny", "holder": "h", "wait_seconds": 0}
    assert api.post("/api/slots/allocate/", body, format="json").status_code == 201
    busy = api.post("/api/slots/allocate/", body, format="json")
    assert busy.status_code == 503
    assert busy["Retry-After"] and busy.json()["code"] == "no_slot_available"


def test_commands_add_warm_and_reap(make_repo):
    out = io.StringIO()
    call_command(
        "add_repository", "cli-repo", str(make_repo()), "--pool-size", "2", "--keep", ".venv", "--warm", stdout=out
    )
    text = out.getvalue()
    assert "registered cli-repo" in text and text.count(": free") == 2
    out = io.StringIO()
    call_command("warm_pool", "cli-repo", stdout=out)
    assert out.getvalue().count(": free") == 2
    with pytest.raises(CommandError, match="unknown repository"):
        call_command("warm_pool", "nope")
    with pytest.raises(CommandError, match="not a reachable git repository"):
        call_command("add_repository", "bad", "/no/such/path")
    with pytest.raises(CommandError, match="name"):
        call_command("add_repository", "bad name", str(make_repo()))
    out = io.StringIO()
    call_command("reap_leases", stdout=out)
    assert "reaped 0 slot(s)" in out.getvalue()


def test_admin_actions_force_release_and_mark_broken(staff_api, repository):
    from repopool import services

    services.pool_warm(repository=repository)
    lease = services.slot_allocate(repository=repository, holder="stuck")
    (lease.path / "junk").write_text("x")
    client = Client()
    client.force_login(staff_api.user)
    assert client.get("/admin/repopool/slot/").status_code == 200
    client.post("/admin/repopool/slot/", {"action": "force_release", "_selected_action": [lease.slot_id]})
    slot = Slot.objects.get(pk=lease.slot_id)
    assert slot.state == "free" and not (lease.path / "junk").exists()
    client.post("/admin/repopool/slot/", {"action": "mark_broken", "_selected_action": [lease.slot_id]})
    assert Slot.objects.get(pk=lease.slot_id).state == "broken"
    client.post("/admin/repopool/repository/", {"action": "warm_repositories", "_selected_action": [repository.pk]})
    assert Slot.objects.get(pk=lease.slot_id).state == "broken"  # requested, not run in the request
    assert [r.pk for r in services.pool_warm_requested()] == [repository.pk]
    assert Slot.objects.get(pk=lease.slot_id).state == "free"


def test_runagent_repo_argument_takes_a_registered_name_a_path_or_a_url(repository, make_repo, tmp_path, monkeypatch):
    from repopool.services import repository_find_or_create_for_url

    assert repository_find_or_create_for_url(url="sample") == repository  # a registered name
    assert repository_find_or_create_for_url(url=repository.url) == repository  # its URL
    monkeypatch.chdir(Path(repository.url).parent)
    assert repository_find_or_create_for_url(url=Path(repository.url).name) == repository  # a relative path
    other = repository_find_or_create_for_url(url=str(make_repo(name="fresh")))
    assert other.name == "fresh" and other != repository
