"""The run's events while it holds a slot: written by the heartbeat thread when the registry port
waits on its store (in-process), so the run never waits on them, in the order the run recorded
them, all of them before the run goes on once the thread stops; the first heartbeat records the
slot at once. A deterministic registry double stands in for the port (the protocol's seam); the
full pipeline against the real database is checked at the end."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from agentrunner.runner import pipeline
from agentrunner.runner.ports import ClaimedTask, Heartbeat, Ports, Timed
from registry.models import Attempt, Task
from registry.services import task_create
from tests.runner.conftest import fixer


class SlowRegistry:
    """Records who wrote which events and when; each write takes ``delay`` seconds."""

    def __init__(self, *, events_block: bool, delay: float = 0.2):
        self.events_block = events_block
        self.delay = delay
        self.writes: list[tuple[str, list[str]]] = []
        self.beats: list[tuple[float, int | None]] = []

    def events(self, *, task, events):
        time.sleep(self.delay)
        self.writes.append((threading.current_thread().name, [e["type"] for e in events]))

    def heartbeat(self, *, task, slot_id=None, metrics=None):
        self.beats.append((time.monotonic(), slot_id))
        return Heartbeat(cancel_requested=False)


class NoPool:
    def renew(self, **kwargs):
        return None


def _run(registry) -> pipeline.TaskRun:
    task = ClaimedTask(
        id=uuid.uuid4(), title="t", instructions="x", repository_id=1, repository_name="r", base_ref="main",
        test_command="true", keep_paths=[], push_url="", timeout_seconds=60, max_iterations=1, llm_model="",
        max_steps=None, max_tokens=None, max_cost_usd=None, attempt_id=1, attempt_number=1, max_attempts=1,
    )  # fmt: skip
    return pipeline.TaskRun(task, Ports(registry, NoPool(), None, Timed()), "runner", None)


def test_events_go_to_the_heartbeat_thread_in_order_and_are_all_written_when_it_stops():
    registry = SlowRegistry(events_block=True)
    run = _run(registry)
    run.event("before")  # no thread yet: written by the run itself
    run.heartbeat = pipeline.HeartbeatThread(run, slot_id=7)
    started = time.monotonic()
    run.heartbeat.start()
    while not run.heartbeat.offer({"type": "first", "message": "", "data": {}}):
        time.sleep(0.001)  # accepted once the thread runs
    for n in range(5):
        run.event(f"e{n}")
    assert time.monotonic() - started < registry.delay  # the run did not wait on a single write
    run.heartbeat.stop()
    run.event("after")  # the thread stopped: the run writes, after everything queued
    main = threading.current_thread().name
    assert registry.writes[0] == (main, ["before"]) and registry.writes[-1] == (main, ["after"])
    queued = registry.writes[1:-1]
    assert all(name == run.heartbeat.name for name, _ in queued)
    assert [kind for _, kinds in queued for kind in kinds] == ["first", "e0", "e1", "e2", "e3", "e4"]
    assert len(queued) < 6  # what piled up while one write was under way went as one batch
    # The first beat went out at once, with the slot.
    assert registry.beats[0][1] == 7 and registry.beats[0][0] - started < 0.5
    run.log.close()


def test_a_registry_that_does_not_block_gets_the_events_from_the_run_itself():
    registry = SlowRegistry(events_block=False, delay=0)
    run = _run(registry)
    run.heartbeat = pipeline.HeartbeatThread(run, slot_id=None)
    run.heartbeat.start()
    run.event("one")
    run.heartbeat.stop()
    assert registry.writes == [(threading.current_thread().name, ["one"])]
    run.log.close()


@pytest.mark.django_db(transaction=True)
def test_a_run_records_its_events_in_order_and_its_slot(llm, sample_repo):
    llm.responder = fixer
    task = task_create(title="t", instructions="make add() add", repository=sample_repo)
    summary = pipeline.run_task(task_id=task.pk, runner_id="test-runner")
    assert summary.status == "succeeded", summary.message
    events = list(Task.objects.get(pk=task.pk).events.order_by("seq").values_list("type", flat=True))
    assert events == [
        "created", "status", "claimed", "slot_leased", "prepared",
        "llm_call", "tool_call", "llm_call", "tests", "tool_call", "llm_call", "tool_call",
        "tests", "committed", "status",
    ], " ".join(events)  # fmt: skip
    assert Attempt.objects.get(task_id=task.pk).slot_id is not None


def test_lost_lease_on_the_first_beat_stops_the_run():
    class Lost(SlowRegistry):
        def heartbeat(self, **kwargs):
            from common.outcomes import LeaseLost

            raise LeaseLost("gone")

    run = _run(Lost(events_block=True, delay=0))
    run.heartbeat = pipeline.HeartbeatThread(run, slot_id=3)
    run.heartbeat.start()
    assert run.cancel.wait(5) and run.lease_lost
    run.heartbeat.stop()
    run.event("after")  # still recorded, by the run
    assert run.heartbeat.is_alive() is False
    run.log.close()
