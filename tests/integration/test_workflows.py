"""Whole workflows across the three services, as a runner host on another machine drives them:
a task from claim to published result, recovery from lost responses and failed uploads, and
several runners at once."""

from __future__ import annotations

import hashlib
import random
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import run_git
from tests.integration.conftest import cancel_unfinished, unique
from tests.integration.deployment import expect
from tests.integration.runner_api import Claimed, RunnerAPI, new_key

FIXED_CALC = "def add(a, b):\n    return a + b\n"


def git_bytes(cwd, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True).stdout


def test_a_whole_task_across_the_three_services(deployment, registry, pool, store, runner_api, make_task, tmp_path):
    task = make_task()
    repo_id = task["repository_id"]
    host = unique("it-host")
    expect(runner_api.register_host(host, {task["repository"]: 1}), 200)

    claimed = runner_api.claim(runner_id=f"{host}:1", task_id=task["id"])
    assert claimed.task["repository_name"] == task["repository"] and claimed.task["base_ref"] == "main"
    leased = expect(
        runner_api.allocate(
            repo_id, host=host, holder=f"{host}:1", attempt_id=claimed.attempt_id, lease=claimed.lease_token
        ),
        200,
    )
    slot, spec = leased["slot"], leased["repository"]
    assert spec["name"] == task["repository"] and spec["default_branch"] == "main"

    # The working copy lives here, on the runner host: the server keeps only the bookkeeping.
    copy = tmp_path / "slot"
    run_git(tmp_path, "clone", "-q", spec["url"], str(copy))
    base = run_git(copy, "rev-parse", "HEAD")
    expect(runner_api.prepared(slot["id"], slot["token"], commit=base), 200)
    assert expect(runner_api.heartbeat(claimed, slot_id=slot["id"]), 200)["cancel_requested"] is False
    expect(
        runner_api.events(
            claimed,
            [
                {"type": "agent_step", "message": "read calc.py", "data": {"tool": "read_file"}},
                {"type": "agent_step", "message": "fix add()", "data": {"tool": "write_file"}},
            ],
        ),
        200,
    )

    branch = f"agent/{task['id'][:8]}"
    run_git(copy, "checkout", "-q", "-b", branch)
    (copy / "calc.py").write_text(FIXED_CALC)
    run_git(copy, "commit", "-q", "-am", "Make add() add")
    commit = run_git(copy, "rev-parse", "HEAD")
    patch = git_bytes(copy, "format-patch", "--stdout", f"{base}..{commit}")
    report = b"1 passed in 0.01s\n"
    for content, name, kind in ((patch, "0001-add.patch", "patch"), (report, "tests.txt", "test_report")):
        stored = expect(runner_api.upload(claimed, content, name=name, kind=kind, content_type="text/plain"), 201)
        expect(runner_api.link(claimed, stored["id"], kind), 201)
    expect(runner_api.events(claimed, [{"type": "tests", "message": "1 passed", "data": {"passed": 1}}]), 200)

    bundle_path = tmp_path / "result.bundle"
    run_git(copy, "bundle", "create", "-q", str(bundle_path), f"{base}..{branch}")
    published = expect(runner_api.results(claimed, bundle_path.read_bytes(), branch=branch, base=base), 200)
    assert published["commit"] == commit and branch in published["fetch"]

    result = {
        "result_branch": branch,
        "result_commit": commit,
        "result_fetch": published["fetch"],
        "tests_passed": True,
        "summary": "add() adds",
    }
    assert expect(runner_api.finish(claimed, "succeeded", message="tests pass", result=result), 200) == {
        "status": "succeeded"
    }
    released = expect(runner_api.release(slot["id"], slot["token"], commit=commit), 200)
    assert released["state"] == "free"

    done = expect(registry.get(f"/api/tasks/{task['id']}/"), 200)
    assert (done["status"], done["result_branch"], done["result_commit"]) == ("succeeded", branch, commit)
    assert done["result_fetch"] == published["fetch"] and done["tests_passed"] is True
    artifacts = expect(registry.get(f"/api/tasks/{task['id']}/artifacts/"), 200)
    assert sorted(a["kind"] for a in artifacts) == ["patch", "test_report"]
    by_kind = {a["kind"]: a["id"] for a in artifacts}
    assert store.get(f"/api/artifacts/{by_kind['patch']}/content/").content == patch
    events = expect(registry.get(f"/api/tasks/{task['id']}/events/"), 200)
    messages = [e["message"] for e in events]
    assert messages.index("read calc.py") < messages.index("fix add()") < messages.index("1 passed")
    assert expect(pool.get(f"/api/slots/{slot['id']}/"), 200)["state"] == "free"


# --- error recovery -----------------------------------------------------------------------------
def test_calls_retried_with_the_same_key_after_a_lost_response_change_nothing(registry, store, runner_api, make_task):
    """Each call is sent twice with one Idempotency-Key, as a runner does when the first answer
    never reached it: the second gets the first's answer, and the server acted once."""
    task = make_task()
    claim_key = new_key()
    first = expect(runner_api.claim_response(runner_id="it-retry", task_id=task["id"], key=claim_key), 200)
    replay = expect(runner_api.claim_response(runner_id="it-retry", task_id=task["id"], key=claim_key), 200)
    assert replay["attempt"] == first["attempt"]
    claimed = Claimed.from_body(first)

    batch = [{"type": "agent_step", "message": f"once {n}", "data": {}} for n in range(3)]
    key = new_key()
    sent = expect(runner_api.events(claimed, batch, key=key), 200)
    assert expect(runner_api.events(claimed, batch, key=key), 200) == sent
    reused = runner_api.events(claimed, batch[:1], key=key)  # same key, another request
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"

    content = b"uploaded once\n"
    key = new_key()
    stored = expect(runner_api.upload(claimed, content, name="once.log", kind="log", key=key), 201)
    assert expect(runner_api.upload(claimed, content, name="once.log", kind="log", key=key), 201) == stored
    key = new_key()
    expect(runner_api.link(claimed, stored["id"], "log", key=key), 201)
    expect(runner_api.link(claimed, stored["id"], "log", key=key), 201)

    key = new_key()
    assert expect(runner_api.finish(claimed, "succeeded", key=key), 200) == {"status": "succeeded"}
    assert expect(runner_api.finish(claimed, "succeeded", key=key), 200) == {"status": "succeeded"}

    attempts = expect(registry.get(f"/api/tasks/{task['id']}/attempts/"), 200)
    assert len(attempts) == 1
    events = expect(registry.get(f"/api/tasks/{task['id']}/events/"), 200)
    assert [e["message"] for e in events].count("once 0") == 1
    assert sum(1 for e in events if e["type"] == "claimed") == 1
    assert sum(1 for e in events if e["type"] == "status" and e["data"].get("to") == "succeeded") == 1
    assert [a["id"] for a in expect(registry.get(f"/api/tasks/{task['id']}/artifacts/"), 200)] == [stored["id"]]
    assert expect(store.get("/api/artifacts/", params={"task": task["id"]}), 200)["count"] == 1


def test_an_artifact_upload_that_fails_is_retried_and_succeeds(registry, store, runner_api, make_task):
    task = make_task()
    claimed = runner_api.claim(runner_id="it-upload", task_id=task["id"])
    content = b"the run log\n" * 1000
    corrupted = runner_api.upload(
        claimed, content, name="run.log", kind="log", sha256=hashlib.sha256(b"what the runner hashed").hexdigest()
    )
    assert corrupted.status_code == 400 and corrupted.json()["code"]
    assert expect(registry.get(f"/api/tasks/{task['id']}/artifacts/"), 200) == []
    # The runner sends it again (a new request: a new key) and the task goes on.
    stored = expect(runner_api.upload(claimed, content, name="run.log", kind="log"), 201)
    expect(runner_api.link(claimed, stored["id"], "log"), 201)
    expect(runner_api.finish(claimed, "succeeded"), 200)
    listed = expect(registry.get(f"/api/tasks/{task['id']}/artifacts/"), 200)
    assert [(a["id"], a["kind"]) for a in listed] == [(stored["id"], "log")]
    assert store.get(f"/api/artifacts/{stored['id']}/content/").content == content


# --- several runners ----------------------------------------------------------------------------
def test_concurrent_runners_finish_every_task_exactly_once(deployment, registry, repository, report):
    """Runners on several threads (each its own connections) race for the same tasks: each runner
    tries every task, in its own order; the server hands each to exactly one."""
    tasks, runners = 16, 6
    ids = [
        expect(
            registry.post(
                "/api/tasks/",
                json={"repository": repository["name"], "instructions": f"concurrent {n}", "title": f"cc-{n}"},
            ),
            201,
        )["id"]
        for n in range(tasks)
    ]
    done: list[tuple[str, str, int]] = []
    lock = threading.Lock()

    def run(runner_number: int) -> None:
        api = RunnerAPI(deployment)
        name = f"it-cc-{runner_number}-{uuid.uuid4().hex[:6]}"
        order = list(ids)
        random.Random(runner_number).shuffle(order)
        for task_id in order:
            response = api.claim_response(runner_id=name, task_id=task_id)
            if response.status_code in (204, 409):  # another runner has it
                continue
            claimed = Claimed.from_body(expect(response, 200))
            expect(api.heartbeat(claimed), 200)
            expect(api.events(claimed, [{"type": "agent_step", "message": name, "data": {}}]), 200)
            expect(api.finish(claimed, "succeeded", message=name), 200)
            with lock:
                done.append((task_id, name, claimed.number))

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=runners) as pool_of_runners:
            list(pool_of_runners.map(run, range(runners)))
        seconds = time.perf_counter() - started
    finally:
        cancel_unfinished(registry, ids)
    assert sorted(task_id for task_id, _, _ in done) == sorted(ids), "every task claimed exactly once"
    assert {number for _, _, number in done} == {1}
    report(f"concurrent runners: {tasks} tasks in {seconds:.1f} s ({tasks / seconds:.1f} claim-to-finish/s), per runner "
           f"{sorted(sum(1 for _, n, _ in done if n == r) for r in {n for _, n, _ in done})}")  # fmt: skip
    for task_id in ids:
        task = expect(registry.get(f"/api/tasks/{task_id}/"), 200)
        assert (task["status"], task["attempts_count"]) == ("succeeded", 1)
