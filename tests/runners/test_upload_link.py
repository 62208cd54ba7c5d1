"""An upload that links in the same call (X-Artifact-Role), and the attempt an upload is filed
under: a spooled artifact re-uploaded by a later attempt keeps the attempt that made it (the runner
names it in X-Artifact-Metadata), and only an attempt of that same task is accepted."""

from __future__ import annotations

import json

import pytest

from artifacts.models import Artifact
from registry import services as registry
from registry.models import TaskArtifact
from tests.runners.conftest import claim

pytestmark = pytest.mark.django_db


def _meta(value) -> dict[str, str]:
    return {"X-Artifact-Metadata": value if isinstance(value, str) else json.dumps(value)}


def _second_attempt(runner, repo):
    """A task whose first attempt ended retryable and whose second is now claimed."""
    registry.task_create(title="twice", instructions="x", repository=repo, max_attempts=3)
    first = claim(runner)
    finish = runner.post(
        f"attempts/{first.attempt_id}/finish/",
        {"status": "failed", "failure_reason": "infrastructure_error", "message": "store down", "retry": True},
        lease=first.lease,
    )
    assert finish.status_code == 200 and finish.json()["status"] == "queued", finish.content
    second = claim(runner)
    assert second.task_id == first.task_id and second.body["attempt"]["number"] == 2
    return second


def test_upload_with_a_role_is_linked_in_the_same_call(runner, claimed):
    a, lease = claimed.attempt_id, claimed.lease
    response = runner.upload(a, b"diff\n", lease=lease, kind="patch", key="up-1", headers={"X-Artifact-Role": "patch"})
    assert response.status_code == 201, response.content
    link = TaskArtifact.objects.get(task_id=claimed.task_id)
    assert (str(link.artifact_id), link.role, link.attempt_number) == (response.json()["id"], "patch", 1)
    # A retry of the same call replays: one artifact, one link.
    again = runner.upload(a, b"diff\n", lease=lease, kind="patch", key="up-1", headers={"X-Artifact-Role": "patch"})
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert TaskArtifact.objects.filter(task_id=claimed.task_id).count() == 1
    assert Artifact.objects.count() == 1
    # Without the header nothing is linked (artifact-links/ does it later).
    plain = runner.upload(a, b"log\n", lease=lease)
    assert plain.status_code == 201
    assert TaskArtifact.objects.filter(task_id=claimed.task_id).count() == 1


def test_a_lost_lease_neither_stores_nor_links(runner, claimed):
    a, lease = claimed.attempt_id, claimed.lease
    assert runner.post(f"attempts/{a}/finish/", {"status": "succeeded"}, lease=lease).status_code == 200
    response = runner.upload(a, b"late\n", lease=lease, headers={"X-Artifact-Role": "log"})
    assert response.status_code == 409 and response.json()["code"] == "lease_lost"
    assert not TaskArtifact.objects.filter(task_id=claimed.task_id).exists() and not Artifact.objects.exists()


def test_a_spooled_reupload_is_linked_to_its_origin_attempt(runner, repo):
    second = _second_attempt(runner, repo)
    a, lease = second.attempt_id, second.lease
    spooled = runner.upload(
        a, b"attempt one's log\n", lease=lease,
        headers={"X-Artifact-Role": "log", **_meta({"task": "ignored", "attempt": 1, "spooled": True, "x": "y"})},
    )  # fmt: skip
    assert spooled.status_code == 201, spooled.content
    own = runner.upload(a, b"attempt two's log\n", lease=lease, headers={"X-Artifact-Role": "log", **_meta({})})
    assert own.status_code == 201, own.content
    links = {str(link.artifact_id): link.attempt_number for link in TaskArtifact.objects.filter(role="log")}
    assert links == {spooled.json()["id"]: 1, own.json()["id"]: 2}
    metadata = Artifact.objects.get(pk=spooled.json()["id"]).metadata
    assert metadata["attempt"] == 1 and metadata["uploaded_by_attempt"] == 2 and metadata["spooled"] is True
    assert metadata["task"] == str(second.task_id) and "x" not in metadata  # the server's keys win

    # The two-call path (upload, then artifact-links/) files it under its origin too.
    later = runner.upload(a, b"attempt one's patch\n", lease=lease, kind="patch", headers=_meta({"attempt": 1}))
    assert later.status_code == 201, later.content
    link = runner.post(
        f"attempts/{a}/artifact-links/", {"artifact_id": later.json()["id"], "role": "patch"}, lease=lease
    )
    assert link.status_code == 201, link.content
    assert TaskArtifact.objects.get(role="patch").attempt_number == 1


@pytest.mark.parametrize(
    "metadata, reason",
    [
        ({"attempt": 2}, "not an attempt of this task"),  # the other task has an attempt 2
        ({"attempt": 3}, "not an attempt of this task"),  # an attempt that never was
        ({"attempt": 0}, "not an attempt of this task"),
        ({"attempt": "1"}, "integer"),
        ({"attempt": True}, "integer"),
        ("[1]", "JSON object"),
        ("{not json", "not valid JSON"),
        (json.dumps({"attempt": 1, "pad": "x" * 3000}), "exceeds"),
    ],
)
def test_an_attempt_number_not_of_this_task_is_refused(runner, repo, metadata, reason):
    # Another task with more attempts: its attempt numbers mean nothing for this one.
    other = _second_attempt(runner, repo)
    assert other.body["attempt"]["number"] == 2
    registry.task_create(title="one", instructions="x", repository=repo)
    claimed = claim(runner)
    assert claimed.task_id != other.task_id and claimed.body["attempt"]["number"] == 1
    response = runner.upload(
        claimed.attempt_id, b"x", lease=claimed.lease, headers={"X-Artifact-Role": "log", **_meta(metadata)}
    )
    assert response.status_code == 400, response.content
    body = response.json()
    assert "X-Artifact-Metadata" in body["errors"] and reason in json.dumps(body), body
    assert not Artifact.objects.filter(metadata__task=str(claimed.task_id)).exists()
    assert not TaskArtifact.objects.filter(task_id=claimed.task_id).exists()


def test_a_bad_role_is_refused(runner, claimed):
    response = runner.upload(claimed.attempt_id, b"x", lease=claimed.lease, headers={"X-Artifact-Role": "a b"})
    assert response.status_code == 400 and "X-Artifact-Role" in response.json()["errors"]
    assert not Artifact.objects.exists()
