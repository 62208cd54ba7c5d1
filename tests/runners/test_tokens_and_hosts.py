"""Runner tokens: made by a command, shown once, stored hashed, revocable, confined to the runner
API; hosts bound to the token that registered them."""

from __future__ import annotations

import hashlib
import io
import re

import pytest
from django.core.management import CommandError, call_command

from runners import services as runners
from runners.models import RunnerHost, RunnerToken
from tests.runners.conftest import RunnerClient

pytestmark = pytest.mark.django_db
TOKEN_RE = re.compile(r"^art_r_[A-Za-z0-9_-]{43}$")


def _command(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_commands_create_list_revoke():
    out, err = _command("create_runner_token", "host-a")
    raw = out.strip()
    assert TOKEN_RE.match(raw) and "only this once" in err
    token = RunnerToken.objects.get(name="host-a")
    assert token.token_hash == hashlib.sha256(raw.encode()).hexdigest() and raw not in str(token.__dict__)
    assert raw.startswith(token.prefix)
    with pytest.raises(CommandError, match="exists"):
        _command("create_runner_token", "host-a")
    assert RunnerClient(raw).post("hosts/", {"name": "h1"}).status_code == 200

    listed, _ = _command("list_runner_tokens")
    assert "host-a" in listed and token.prefix in listed and "h1" in listed and raw not in listed

    out, _ = _command("revoke_runner_token", "host-a")
    assert "revoked host-a" in out
    refused = RunnerClient(raw).post("hosts/", {"name": "h1"})
    assert refused.status_code == 401 and refused.json()["code"] == "token_revoked"
    with pytest.raises(CommandError, match="no runner token"):
        _command("revoke_runner_token", "nobody")


def test_unknown_runner_token_401(db):
    response = RunnerClient("art_r_" + "x" * 43).post("claim/", {"runner_id": "r"})
    assert response.status_code == 401 and response.json()["code"] == "invalid_token"
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_anonymous_401_user_token_403(api, staff_api):
    from rest_framework.test import APIClient

    assert APIClient().post("/api/runner/v1/claim/", {"runner_id": "r"}, format="json").status_code == 401
    for client in (api, staff_api):
        response = client.post("/api/runner/v1/claim/", {"runner_id": "r"}, format="json", HTTP_IDEMPOTENCY_KEY="k")
        assert response.status_code == 403 and response.json()["code"] == "runner_token_required"


@pytest.mark.parametrize(
    "path", ["/api/tasks/", "/api/repositories/", "/api/artifacts/", "/admin/", "/runs/", "/metrics"]
)
def test_runner_token_refused_outside_runner_api(runner, path):
    for scheme in ("Bearer", "Token"):
        response = runner.client.get(path, HTTP_AUTHORIZATION=f"{scheme} {runner.raw_token}")
        assert response.status_code == 401, (path, scheme)
        assert response.json()["code"] == "runner_token_not_allowed"
    assert runner.client.post("/api/repositories/", {"name": "x", "url": "/tmp"}, format="json").status_code == 401


def test_host_bound_to_first_token(runner):
    first = runner.post("hosts/", {"name": "box-1", "capacity": {"sample": 2}, "version": "1.0"})
    assert first.status_code == 200 and first.json() == {"name": "box-1"}
    again = runner.post("hosts/", {"name": "box-1", "capacity": {"sample": 4}, "version": "1.1"})
    assert again.status_code == 200
    host = RunnerHost.objects.get(name="box-1")
    assert (host.capacity, host.version) == ({"sample": 4}, "1.1")
    _token, raw = runners.runner_token_create(name="host-b")
    taken = RunnerClient(raw).post("hosts/", {"name": "box-1", "capacity": {}})
    assert taken.status_code == 409 and taken.json()["code"] == "host_taken"
    assert RunnerHost.objects.get(name="box-1").token.name == "host-a"
    bad = runner.post("hosts/", {"name": "../etc", "capacity": {"sample": -1}})
    assert bad.status_code == 400 and {"name", "capacity"} <= set(bad.json()["errors"])


def test_admin_lists_and_revokes_never_shows_hash(runner_token, client, django_user_model):
    token, raw = runner_token
    admin = django_user_model.objects.create_superuser(username="op", password="pw-op-12345")
    client.force_login(admin)
    page = client.get("/admin/runners/runnertoken/")
    assert page.status_code == 200 and b"host-a" in page.content
    assert token.token_hash.encode() not in page.content and raw.encode() not in page.content
    detail = client.get(f"/admin/runners/runnertoken/{token.pk}/change/")
    assert detail.status_code == 200 and token.token_hash.encode() not in detail.content
    assert client.get("/admin/runners/runnertoken/add/").status_code == 403
    response = client.post(
        "/admin/runners/runnertoken/", {"action": "revoke_tokens", "_selected_action": [token.pk]}, follow=True
    )
    assert response.status_code == 200
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert client.get("/admin/runners/runnerhost/").status_code == 200


# --- how many host names one token may bind ----------------------------------------------------
def test_a_token_binds_at_most_its_host_limit(runner, settings):
    settings.AGENTRUNNER_RUNNER_MAX_HOSTS = 2
    for name in ("box-1", "box-2"):
        assert runner.post("hosts/", {"name": name}).status_code == 200
    refused = runner.post("hosts/", {"name": "box-3"})
    assert refused.status_code == 409, refused.content
    body = refused.json()
    assert body["code"] == "host_limit_reached"
    assert "2 host" in body["detail"] and "--max-hosts" in body["detail"] and "box-3" in body["detail"]
    assert not RunnerHost.objects.filter(name="box-3").exists()
    assert runner.post("hosts/", {"name": "box-1", "capacity": {"sample": 3}}).status_code == 200  # known: fine
    assert RunnerHost.objects.get(name="box-1").capacity == {"sample": 3}


def test_an_operator_gives_one_token_more_hosts(settings):
    settings.AGENTRUNNER_RUNNER_MAX_HOSTS = 1
    out, err = _command("create_runner_token", "fleet", "--max-hosts", "3")
    token = RunnerToken.objects.get(name="fleet")
    assert token.max_hosts == 3 and "at most 3 host" in err
    client = RunnerClient(out.strip())
    assert [client.post("hosts/", {"name": f"f-{i}"}).status_code for i in range(4)] == [200, 200, 200, 409]
    listed, _ = _command("list_runner_tokens")
    header, row = listed.splitlines()[0], next(line for line in listed.splitlines() if line.startswith("fleet"))
    assert "MAX HOSTS" in header and " 3 " in row and "f-0,f-1,f-2" in row
    with pytest.raises(CommandError, match="--max-hosts"):
        _command("create_runner_token", "none", "--max-hosts", "0")


def test_the_admin_edits_a_tokens_host_limit_and_nothing_else(runner_token, client, django_user_model):
    token, _raw = runner_token
    admin = django_user_model.objects.create_superuser(username="op", password="pw-op-12345")
    client.force_login(admin)
    response = client.post(
        f"/admin/runners/runnertoken/{token.pk}/change/", {"name": "renamed", "max_hosts": "5"}, follow=True
    )
    assert response.status_code == 200
    token.refresh_from_db()
    assert (token.name, token.max_hosts) == ("host-a", 5)


@pytest.mark.django_db(transaction=True)
def test_concurrent_registrations_never_pass_the_limit(runner_token, settings, require_postgres):
    import threading

    from django.db import connection

    settings.AGENTRUNNER_RUNNER_MAX_HOSTS = 2
    barrier = threading.Barrier(6)
    codes: list[int] = []

    def register(i: int) -> None:
        client = RunnerClient(runner_token[1])
        barrier.wait()
        try:
            codes.append(client.post("hosts/", {"name": f"race-{i}"}).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=register, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(codes) == [200, 200, 409, 409, 409, 409], codes
    assert RunnerHost.objects.filter(token=runner_token[0]).count() == 2
