"""The repo pool over HTTP (a staff user's slot endpoints): allocate, release, several slots,
renew, fencing by lease token, waiting for a slot and giving up with 503 + Retry-After."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from datetime import datetime

from tests.conftest import run_git
from tests.integration.deployment import expect


def allocate(pool, repo: dict, *, wait: float = 0, lease: int = 600, holder: str = "it", ref: str = "main"):
    return pool.post(
        "/api/slots/allocate/",
        json={"repository": repo["name"], "holder": holder, "lease_seconds": lease, "wait_seconds": wait, "ref": ref},
    )


def release(pool, slot_id: int, token: str):
    return pool.post(f"/api/slots/{slot_id}/release/", json={"lease_token": token})


def test_allocate_gives_a_checked_out_slot_and_release_frees_it(deployment, pool, repository):
    head = run_git(deployment.repo_root / repository["name"], "rev-parse", "HEAD")
    lease = expect(allocate(pool, repository, holder="it-alloc"), 201)
    assert lease["commit"] == head
    uuid.UUID(lease["lease_token"])
    slot = expect(pool.get(f"/api/slots/{lease['id']}/"), 200)
    assert (slot["state"], slot["lease_holder"], slot["repository"]) == ("leased", "it-alloc", repository["name"])
    released = expect(release(pool, lease["id"], lease["lease_token"]), 200)
    assert released["state"] == "free" and released["lease_holder"] == ""
    free = expect(pool.get("/api/slots/", params={"repository": repository["name"], "state": "free"}), 200)
    assert [s["id"] for s in free["results"]] == [lease["id"]]


def test_several_allocations_get_different_slots(pool, make_repository):
    repo = make_repository(pool_size=3)
    leases = [expect(allocate(pool, repo, holder=f"it-{n}"), 201) for n in range(3)]
    assert len({lease["id"] for lease in leases}) == 3
    assert len({lease["path"] for lease in leases}) == 3
    assert len({lease["lease_token"] for lease in leases}) == 3
    leased = expect(pool.get("/api/slots/", params={"repository": repo["name"], "state": "leased"}), 200)
    assert sorted(s["index"] for s in leased["results"]) == [0, 1, 2]
    for lease in leases:
        expect(release(pool, lease["id"], lease["lease_token"]), 200)
    again = expect(allocate(pool, repo), 201)  # a released slot is reused, none is added
    assert again["id"] in {lease["id"] for lease in leases}
    expect(release(pool, again["id"], again["lease_token"]), 200)


def test_renew_extends_the_lease(pool, repository):
    lease = expect(allocate(pool, repository, lease=60), 201)
    before = datetime.fromisoformat(lease["lease_expires_at"])
    renewed = expect(
        pool.post(
            f"/api/slots/{lease['id']}/renew/", json={"lease_token": lease["lease_token"], "lease_seconds": 3600}
        ),
        200,
    )
    after = datetime.fromisoformat(renewed["lease_expires_at"])
    assert (after - before).total_seconds() > 3000
    expect(release(pool, lease["id"], lease["lease_token"]), 200)


def test_a_stale_lease_token_is_refused_with_409_and_changes_nothing(pool, repository):
    lease = expect(allocate(pool, repository, holder="it-holder"), 201)
    wrong = str(uuid.uuid4())
    assert release(pool, lease["id"], wrong).status_code == 409
    renew = pool.post(f"/api/slots/{lease['id']}/renew/", json={"lease_token": wrong})
    assert renew.status_code == 409 and renew.json()["code"]
    slot = expect(pool.get(f"/api/slots/{lease['id']}/"), 200)
    assert (slot["state"], slot["lease_holder"]) == ("leased", "it-holder")
    expect(release(pool, lease["id"], lease["lease_token"]), 200)
    # The old holder's token is stale once released, even after someone else leased the slot.
    second = expect(allocate(pool, repository, holder="it-next"), 201)
    assert second["id"] == lease["id"] and second["lease_token"] != lease["lease_token"]
    assert release(pool, lease["id"], lease["lease_token"]).status_code == 409
    assert expect(pool.get(f"/api/slots/{lease['id']}/"), 200)["lease_holder"] == "it-next"
    expect(release(pool, second["id"], second["lease_token"]), 200)


def test_no_free_slot_within_the_wait_is_503_with_retry_after(pool, repository):
    lease = expect(allocate(pool, repository), 201)
    wait = 1.5
    started = time.monotonic()
    refused = allocate(pool, repository, wait=wait)
    elapsed = time.monotonic() - started
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["code"] and refused.json()["detail"]
    assert wait * 0.9 <= elapsed < wait + 10, elapsed  # it waited, and not unboundedly
    expect(release(pool, lease["id"], lease["lease_token"]), 200)


def test_a_waiting_allocation_gets_the_slot_released_meanwhile(pool, repository):
    lease = expect(allocate(pool, repository, holder="it-first"), 201)
    answered = {}

    def wait_for_it():
        answered["response"] = allocate(pool, repository, holder="it-second", wait=20)

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.5)  # let the second request start waiting; the release below must not depend on it
    expect(release(pool, lease["id"], lease["lease_token"]), 200)
    waiter.join(timeout=30)
    second = expect(answered["response"], 201)
    assert second["id"] == lease["id"]
    assert expect(pool.get(f"/api/slots/{lease['id']}/"), 200)["lease_holder"] == "it-second"
    expect(release(pool, second["id"], second["lease_token"]), 200)


# --- slots of a runner host, through the runner API ----------------------------------------------
def host_with(runner_api, repo: dict, capacity: int) -> str:
    host = f"it-host-{uuid.uuid4().hex[:8]}"
    assert expect(runner_api.register_host(host, {repo["name"]: capacity}), 200)["name"] == host
    return host


def test_a_runner_host_allocates_prepares_renews_and_releases_its_slot(pool, runner_api, repository, tmp_path):
    host = host_with(runner_api, repository, 1)
    leased = expect(runner_api.allocate(repository["id"], host=host, holder="it-host-runner", lease_seconds=60), 200)
    slot, spec = leased["slot"], leased["repository"]
    assert (spec["name"], spec["url"], spec["default_branch"]) == (repository["name"], repository["url"], "main")
    assert slot["token"] and slot["expires_at"]
    # The host makes the working copy (here: a clone) and tells the server what it holds.
    copy = tmp_path / "copy"
    run_git(tmp_path, "clone", "-q", spec["url"], str(copy))
    head = run_git(copy, "rev-parse", "HEAD")
    expect(
        runner_api.prepared(slot["id"], slot["token"], commit=head, setup_hash=hashlib.sha256(b"no setup").hexdigest()),
        200,
    )
    seen = expect(pool.get(f"/api/slots/{slot['id']}/"), 200)
    assert (seen["state"], seen["commit"]) == ("leased", head)

    before = datetime.fromisoformat(slot["expires_at"])
    renewed = expect(runner_api.renew(slot["id"], slot["token"], lease_seconds=3600), 200)
    assert (datetime.fromisoformat(renewed["expires_at"]) - before).total_seconds() > 3000
    assert expect(runner_api.release(slot["id"], slot["token"], commit=head), 200)["state"] == "free"
    assert expect(pool.get(f"/api/slots/{slot['id']}/"), 200)["state"] == "free"


def test_a_runner_host_gets_different_slots_up_to_its_capacity(runner_api, make_repository):
    repo = make_repository(pool_size=1)
    host = host_with(runner_api, repo, 3)  # the host's announced capacity, not the pool size, bounds it
    leases = [expect(runner_api.allocate(repo["id"], host=host, holder=f"it-{n}"), 200)["slot"] for n in range(3)]
    assert len({s["id"] for s in leases}) == 3 and len({s["token"] for s in leases}) == 3
    assert len({s["index"] for s in leases}) == 3
    for slot in leases:
        expect(runner_api.release(slot["id"], slot["token"]), 200)


def test_a_runner_host_with_a_stale_slot_token_gets_409(runner_api, pool, repository):
    host = host_with(runner_api, repository, 1)
    slot = expect(runner_api.allocate(repository["id"], host=host, holder="it-stale"), 200)["slot"]
    wrong = str(uuid.uuid4())
    for refused in (runner_api.renew(slot["id"], wrong), runner_api.release(slot["id"], wrong)):
        assert refused.status_code == 409 and refused.json()["code"] == "stale_lease"
    assert expect(pool.get(f"/api/slots/{slot['id']}/"), 200)["state"] == "leased"
    expect(runner_api.release(slot["id"], slot["token"]), 200)
    late = runner_api.release(slot["id"], slot["token"])
    assert late.status_code == 409 and late.json()["code"] == "stale_lease"


def test_a_runner_host_with_no_free_slot_gets_503_within_the_wait(runner_api, repository):
    host = host_with(runner_api, repository, 1)
    slot = expect(runner_api.allocate(repository["id"], host=host, holder="it-busy"), 200)["slot"]
    wait = 1.5
    started = time.monotonic()
    refused = runner_api.allocate(repository["id"], host=host, holder="it-waiting", wait_seconds=wait)
    elapsed = time.monotonic() - started
    assert refused.status_code == 503 and refused.json()["code"] == "no_slot"
    assert int(refused.headers["Retry-After"]) >= 1
    assert wait * 0.9 <= elapsed < wait + 10, elapsed
    expect(runner_api.release(slot["id"], slot["token"]), 200)
