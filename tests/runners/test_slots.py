"""Slots on a runner host through the runner API: the server keeps the bookkeeping, the host
(here: workcopy.slots in this process, on a pool root of its own) keeps the working copies."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from registry.models import Attempt
from repopool import services as pool
from repopool.models import Slot
from runners import services as runners
from tests.runners.conftest import RunnerClient
from workcopy import slots

pytestmark = pytest.mark.django_db


@pytest.fixture
def host(runner, repo):
    assert runner.post("hosts/", {"name": "box-1", "capacity": {"sample": 2}, "version": "t"}).status_code == 200
    return runner


def _allocate(runner, repo, **extra):
    return runner.post("slots/allocate/", {"repository_id": repo.pk, "holder": "box-1:1", **extra})


def _prepare(answer: dict, pool_root: Path) -> slots.Prepared:
    spec = slots.spec_from_dict(answer["repository"])
    seen = slots.seen_from_dict(answer["slot"], pool_root=pool_root)
    return slots.prepare(spec, seen, "", fetch_ttl=10)


def test_allocate_prepare_renew_release_on_the_host(host, repo, tmp_path):
    pool_root = tmp_path / "host-pool"
    first = _allocate(host, repo, lease_seconds=600)
    assert first.status_code == 200, first.content
    answer = first.json()
    slot = answer["slot"]
    assert slot["path"] == "@box-1/sample/0" and slot["commit"] == "" and slot["needs_reset"] is False
    assert answer["repository"]["name"] == "sample" and answer["repository"]["url"] == repo.url
    assert Slot.objects.get(pk=slot["id"]).host == "box-1"

    prepared = _prepare(answer, pool_root)  # a real clone, on the host's disk
    assert (pool_root / slot["path"] / "calc.py").exists()
    body = {"token": slot["token"], "commit": prepared.commit, "setup_hash": prepared.setup_hash, "fetched": True}
    done = host.post(f"slots/{slot['id']}/prepared/", body)
    assert done.status_code == 200 and done.json() == {"state": "leased"}
    assert Slot.objects.get(pk=slot["id"]).commit == prepared.commit

    renewed = host.post(f"slots/{slot['id']}/renew/", {"token": slot["token"], "lease_seconds": 1200}, key=None)
    assert renewed.status_code == 200
    assert Slot.objects.get(pk=slot["id"]).lease_expires_at > timezone.now() + timedelta(seconds=1100)

    slots.reset(slots.spec_from_dict(answer["repository"]), pool_root / slot["path"], prepared.commit)
    released = host.post(f"slots/{slot['id']}/release/", {"token": slot["token"], "commit": prepared.commit})
    assert released.status_code == 200 and released.json() == {"state": "free"}
    stale = host.post(f"slots/{slot['id']}/renew/", {"token": slot["token"]}, key=None)
    assert stale.status_code == 409 and stale.json()["code"] == "stale_lease"

    again = _allocate(host, repo).json()["slot"]
    assert again["id"] == slot["id"] and again["commit"] == prepared.commit and again["token"] != slot["token"]


def test_capacity_then_no_slot(host, repo):
    ids = {_allocate(host, repo).json()["slot"]["id"] for _ in range(2)}
    assert len(ids) == 2  # grown up to the announced capacity
    started = time.monotonic()
    full = _allocate(host, repo, wait_seconds=1)
    assert full.status_code == 503 and full.json()["code"] == "no_slot" and full["Retry-After"]
    assert time.monotonic() - started >= 0.9
    assert Slot.objects.filter(repository=repo, host="box-1").count() == 2


def test_allocate_replay_leases_once(host, repo):
    body = {"repository_id": repo.pk, "holder": "h"}
    one = host.post("slots/allocate/", body, key="alloc-1")
    two = host.post("slots/allocate/", body, key="alloc-1")
    assert one.status_code == two.status_code == 200 and one.json() == two.json()
    assert Slot.objects.filter(host="box-1", state="leased").count() == 1


def test_other_tokens_host_and_unregistered(host, repo):
    slot = _allocate(host, repo).json()["slot"]
    _token, raw = runners.runner_token_create(name="host-b")
    other = RunnerClient(raw)
    unregistered = other.post("slots/allocate/", {"repository_id": repo.pk, "holder": "b"})
    assert unregistered.status_code == 409 and unregistered.json()["code"] == "host_not_registered"
    assert other.post("hosts/", {"name": "box-2"}).status_code == 200
    for path, body in (
        (f"slots/{slot['id']}/prepared/", {"token": slot["token"], "commit": "a" * 40}),
        (f"slots/{slot['id']}/renew/", {"token": slot["token"]}),
        (f"slots/{slot['id']}/release/", {"token": slot["token"], "commit": ""}),
    ):
        response = other.post(path, body)
        assert response.status_code == 404, (path, response.content)
    assert Slot.objects.get(pk=slot["id"]).state == "leased"
    # Box 2 gets a slot of its own (the repository's pool size: it announced no capacity).
    own = other.post("slots/allocate/", {"repository_id": repo.pk, "holder": "b"}).json()["slot"]
    assert Slot.objects.get(pk=own["id"]).host == "box-2"
    assert host.post("slots/allocate/", {"repository_id": 999999, "holder": "x"}).status_code == 404


def test_server_host_name_is_reserved(runner, settings):
    taken = runner.post("hosts/", {"name": settings.AGENTRUNNER_HOST})
    assert taken.status_code == 409 and taken.json()["code"] == "host_taken"


def test_expired_remote_lease_is_freed_for_a_reset(host, repo):
    slot = _allocate(host, repo, lease_seconds=60).json()["slot"]
    assert host.post(f"slots/{slot['id']}/prepared/", {"token": slot["token"], "commit": "a" * 40}).status_code == 200
    Slot.objects.filter(pk=slot["id"]).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert slot["id"] in pool.slots_reap()
    stale = host.post(f"slots/{slot['id']}/release/", {"token": slot["token"], "commit": ""})
    assert stale.status_code == 409 and stale.json()["code"] == "stale_lease"
    again = _allocate(host, repo).json()["slot"]
    assert again["id"] == slot["id"] and again["needs_reset"] is True and again["commit"] == "a" * 40


def test_allocate_for_an_attempt_is_fenced(host, repo, claimed):
    wrong = _allocate(host, repo, attempt_id=claimed.attempt_id)  # no lease token of the attempt
    assert wrong.status_code == 409 and wrong.json()["code"] == "lease_lost"
    assert not Slot.objects.filter(state="leased").exists()
    response = host.post(
        "slots/allocate/",
        {"repository_id": repo.pk, "holder": "a", "attempt_id": claimed.attempt_id},
        lease=claimed.lease,
    )
    assert response.status_code == 200
    assert Attempt.objects.get(pk=claimed.attempt_id).slot_id == response.json()["slot"]["id"]


def test_release_broken(host, repo):
    slot = _allocate(host, repo).json()["slot"]
    broken = host.post(f"slots/{slot['id']}/release/", {"token": slot["token"], "broken_reason": "disk gone"})
    assert broken.status_code == 200 and broken.json() == {"state": "broken"}
    assert Slot.objects.get(pk=slot["id"]).last_error == "disk gone"
    bad = host.post(f"slots/{slot['id']}/prepared/", {"token": "nope", "commit": "xyz"})
    assert bad.status_code == 400 and {"token", "commit"} <= set(bad.json()["errors"])
