"""The task state machine, driven at random over the real services on PostgreSQL.

A Hypothesis rule-based machine plays two runners and one user against 2-4 tasks (one depending
on another): create, claim, heartbeat, stall (a runner that stops heartbeating), finish
(succeeded, failed, cancelled, or failed with retry: the runner's requeue), retry, cancel and
reap. Each rule checks the outcome the state machine promises; the invariants run after every
step.

"A cancel request is never lost", precisely: once ``task_cancel`` hits a running task whose open
attempt is N, the task stays running with ``cancel_requested`` until attempt N ends, and then
ends ``cancelled`` -- whether the runner reported failed (with or without retry) or cancelled,
or the attempt was reaped as lost -- unless the runner reported ``succeeded``, which ends the
task ``succeeded`` (finished work is kept). No other actor can move the task meanwhile: a retry
is refused, and a second cancel only repeats the request.
"""

from __future__ import annotations

import hypothesis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from registry import services
from registry.errors import AttemptLost, InvalidTransition
from registry.models import Attempt, Task, TaskEvent
from registry.states import MACHINE, TERMINAL, Action, TaskStatus

S = TaskStatus
RUNNERS = ["runner-1", "runner-2"]
FINISHES = [S.SUCCEEDED, S.FAILED, S.CANCELLED]


def snapshot() -> tuple:
    """Every row the services write, to prove a refused action changed nothing."""
    return (
        list(Task.objects.order_by("pk").values()),
        list(Attempt.objects.order_by("pk").values()),
        list(TaskEvent.objects.order_by("pk").values_list("pk", "task_id", "seq", "type")),
    )


def status_history(events: list[TaskEvent]) -> list[str]:
    """The statuses a task went through, rebuilt from its events alone; each step is checked
    against the machine's table (a claim is the claim action, a status event names its action)."""
    history = [S.PENDING]
    for event in events:
        if event.type == "claimed":
            action = Action.CLAIM
        elif event.type == "status":
            action = Action(event.data["action"])
        else:
            continue
        source, target = event.data["from"], event.data["to"]
        assert source == history[-1], (event.seq, event.data, history)
        assert MACHINE.get((action, source)) == target, (action, source, target)
        history.append(target)
    return history


class TaskMachine(RuleBasedStateMachine):
    repository = None  # set by the test: the fixture's repository

    def __init__(self) -> None:
        super().__init__()
        Task.objects.all().delete()  # a fresh registry per example (attempts and events cascade)
        self.tasks: list = []
        # What each runner believes it holds: (task id, attempt id, attempt number), kept until the
        # runner finishes it, even after the reaper took it away (a stale runner).
        self.held: dict[str, list[tuple]] = {runner: [] for runner in RUNNERS}
        # task id -> attempt number that was running when a cancel was requested.
        self.cancel_asked: dict = {}
        # Statuses seen after each step, per task: must be a subsequence of the event history.
        self.observed: dict = {}

    # --- helpers ----------------------------------------------------------------------------------
    def _task(self, index: int) -> Task:
        return Task.objects.get(pk=self.tasks[index % len(self.tasks)])

    def _refused(self, call, *, exc_type=InvalidTransition, contains: str = "") -> None:
        before = snapshot()
        with pytest.raises(exc_type) as raised:
            call()
        hypothesis.event(f"refused: {raised.value.message.split(':')[0].split(' (')[0]}")
        assert contains in raised.value.message
        assert snapshot() == before, "a refused action changed something"

    def _attempt_ended(self, task_id, number: int, reported: str | None) -> None:
        """Attempt ``number`` of the task just ended (``reported`` by its runner, None when
        reaped): honour a cancel requested while it ran."""
        if self.cancel_asked.get(task_id) != number:
            return
        del self.cancel_asked[task_id]
        task = Task.objects.get(pk=task_id)
        expected = S.SUCCEEDED if reported == S.SUCCEEDED else S.CANCELLED
        assert task.status == expected, (reported, task.status)
        hypothesis.event(f"cancel request met its attempt's end: {reported or 'reaped'} -> {task.status}")

    def _in(self, statuses, index: int) -> Task | None:
        tasks = list(Task.objects.filter(status__in=statuses).order_by("created_at"))
        return tasks[index % len(tasks)] if tasks else None

    # --- rules ----------------------------------------------------------------------------------
    @initialize(first_attempts=st.integers(1, 3), second_attempts=st.integers(1, 3))
    def two_tasks(self, first_attempts, second_attempts):
        """Every run starts with a task and one that depends on it."""
        self.create(depends=[], max_attempts=first_attempts)
        self.create(depends=[0], max_attempts=second_attempts)

    @rule(
        depends=st.lists(st.integers(0, 3), max_size=2, unique=True),
        max_attempts=st.integers(1, 3),
    )
    @precondition(lambda self: len(self.tasks) < 4)
    def create(self, depends, max_attempts):
        if not self.tasks:
            depends = []
        elif len(self.tasks) == 1:
            depends = [0]  # the second task always depends on the first
        dependencies = [Task.objects.get(pk=self.tasks[i % len(self.tasks)]) for i in depends]
        task = services.task_create(
            title=f"t{len(self.tasks)}",
            instructions="do it",
            repository=self.repository,
            max_attempts=max_attempts,
            depends_on=dependencies,
        )
        self.tasks.append(task.pk)
        if not dependencies:
            assert task.status == S.QUEUED
        elif all(d.status == S.SUCCEEDED for d in dependencies):
            assert task.status == S.QUEUED
        elif any(d.status in (S.FAILED, S.CANCELLED) for d in dependencies):
            assert task.status == S.FAILED and task.failure_reason == "dependency_failed"
        else:
            assert task.status == S.PENDING

    @rule(runner=st.sampled_from(RUNNERS), named=st.none() | st.integers(0, 3))
    def claim(self, runner, named):
        task_id = None
        if named is not None:
            task = self._task(named)
            task_id = task.pk
            if task.status != S.QUEUED:
                self._refused(
                    lambda: services.task_claim(runner_id=runner, task_id=task_id),
                    contains=f"cannot claim a {task.status} task",
                )
                return
        runnable = Task.objects.filter(status=S.QUEUED).exists()
        got = services.task_claim(runner_id=runner, task_id=task_id)
        assert (got is not None) == runnable
        if got is None:
            return
        task, attempt = got
        assert task.status == S.RUNNING and attempt.number == task.attempts_count
        assert not task.cancel_requested
        self.held[runner].append((task.pk, attempt.pk, attempt.number))

    @rule(runner=st.sampled_from(RUNNERS), which=st.integers(0, 3))
    @precondition(lambda self: any(self.held.values()))
    def heartbeat(self, runner, which):
        if not self.held[runner]:
            return
        _, attempt_id, _ = self.held[runner][which % len(self.held[runner])]
        if Attempt.objects.get(pk=attempt_id).outcome == "running":
            services.attempt_update(attempt_id=attempt_id, metrics={"beat": which})
        else:
            self._refused(lambda: services.attempt_update(attempt_id=attempt_id), exc_type=AttemptLost)

    @rule(runner=st.sampled_from(RUNNERS), which=st.integers(0, 3))
    @precondition(lambda self: any(self.held.values()))
    def stall(self, runner, which):
        """The runner stops heartbeating: its attempt looks stale to the reaper."""
        if self.held[runner]:
            _, attempt_id, _ = self.held[runner][which % len(self.held[runner])]
            Attempt.objects.filter(pk=attempt_id).update(heartbeat_at="2000-01-01T00:00:00Z")

    @rule(
        runner=st.sampled_from(RUNNERS),
        which=st.integers(0, 3),
        status=st.sampled_from(FINISHES),
        retry=st.booleans(),
    )
    @precondition(lambda self: any(self.held.values()))
    def finish(self, runner, which, status, retry):
        if not self.held[runner]:
            return
        task_id, attempt_id, number = self.held[runner].pop(which % len(self.held[runner]))
        if Attempt.objects.get(pk=attempt_id).outcome != "running":  # reaped: a stale runner
            self._refused(
                lambda: services.task_finish(task_id=task_id, attempt_id=attempt_id, status=status, retry=retry),
                exc_type=AttemptLost,
            )
            return
        before = Task.objects.get(pk=task_id)
        task = services.task_finish(
            task_id=task_id, attempt_id=attempt_id, status=status, failure_reason="llm_error", retry=retry
        )
        attempt = Attempt.objects.get(pk=attempt_id)
        if before.cancel_requested and status != S.SUCCEEDED:
            assert task.status == S.CANCELLED and task.failure_reason == "cancelled"
        elif retry and status == S.FAILED and before.attempts_count < before.max_attempts:
            # The runner's requeue: dependencies of a task that ran have all succeeded.
            assert task.status == S.QUEUED and attempt.outcome == "retry"
        else:
            assert task.status == status and attempt.outcome == status
        self._attempt_ended(task_id, number, status)

    @rule(index=st.integers(0, 3))
    def retry(self, index):
        self._retry(self._task(index))

    @rule(index=st.integers(0, 3))
    def retry_an_active_task(self, index):
        """The user's mistake that once requeued a running task: always refused now."""
        task = self._in([S.PENDING, S.QUEUED, S.RUNNING], index)
        if task is not None:
            self._retry(task)

    def _retry(self, task: Task) -> None:
        if task.status not in (S.FAILED, S.CANCELLED):
            self._refused(
                lambda: services.task_retry(task_id=task.pk),
                contains=f"cannot retry a {task.status} task: only failed or cancelled tasks can be retried",
            )
            return
        task = services.task_retry(task_id=task.pk)
        assert not task.cancel_requested and task.max_attempts > task.attempts_count
        if task.status == S.FAILED:  # failed again at once: a dependency is still failed or cancelled
            assert task.failure_reason == "dependency_failed"
        else:
            assert task.status in (S.PENDING, S.QUEUED) and task.finished_at is None

    @rule(index=st.integers(0, 3))
    def cancel(self, index):
        self._cancel(self._task(index))

    @rule(index=st.integers(0, 3))
    def cancel_a_running_task(self, index):
        task = self._in([S.RUNNING], index)
        if task is not None:
            self._cancel(task)

    def _cancel(self, task: Task) -> None:
        if task.status in TERMINAL:
            self._refused(lambda: services.task_cancel(task_id=task.pk), contains=f"cannot cancel a {task.status} task")
            return
        after = services.task_cancel(task_id=task.pk)
        if task.status == S.RUNNING:
            assert after.status == S.RUNNING and after.cancel_requested
            self.cancel_asked.setdefault(task.pk, task.attempts_count)
        else:
            assert after.status == S.CANCELLED and after.finished_at is not None

    @rule(everything=st.booleans())
    def reap(self, everything):
        """The reaper: every running attempt (``stale_after_seconds=0``) or only stalled ones."""
        before = {t.pk: t for t in Task.objects.all()}
        for attempt in services.attempts_reap_lost(stale_after_seconds=0 if everything else 60):
            was = before[attempt.task_id]
            task = Task.objects.get(pk=attempt.task_id)
            if was.cancel_requested:
                assert task.status == S.CANCELLED
            elif was.attempts_count < was.max_attempts:
                assert task.status == S.QUEUED
            else:
                assert task.status == S.FAILED and task.failure_reason == "infrastructure_error"
            self._attempt_ended(attempt.task_id, attempt.number, None)

    # --- invariants -------------------------------------------------------------------------------
    @invariant()
    def registry_is_consistent(self):
        """Checked after every step, from four bulk reads (the whole registry is a few rows)."""
        tasks = {task.pk: task for task in Task.objects.all()}
        attempts: dict = {pk: [] for pk in tasks}
        for attempt in Attempt.objects.order_by("number"):
            attempts[attempt.task_id].append(attempt)
        events: dict = {pk: [] for pk in tasks}
        for event in TaskEvent.objects.order_by("seq"):
            events[event.task_id].append(event)
        dependencies: dict = {pk: set() for pk in tasks}
        for task_id, dependency_id in Task.depends_on.through.objects.values_list("from_task_id", "to_task_id"):
            dependencies[task_id].add(tasks[dependency_id].status)
        for pk, task in tasks.items():
            self._check_attempts(task, attempts[pk])
            self._check_dependencies(task, dependencies[pk])
            self._check_events(task, events[pk])
        for task_id, number in self.cancel_asked.items():
            # A cancel request stays pending on the attempt it was made against.
            task = tasks[task_id]
            assert task.status == S.RUNNING and task.cancel_requested and task.attempts_count == number

    @staticmethod
    def _check_attempts(task: Task, attempts: list[Attempt]) -> None:
        assert [a.number for a in attempts] == list(range(1, task.attempts_count + 1))
        open_numbers = [a.number for a in attempts if a.outcome == "running"]
        # At most one open attempt; a running task has exactly one (its latest), no other has any.
        assert open_numbers == ([task.attempts_count] if task.status == S.RUNNING else []), task.status
        assert (task.finished_at is not None) == (task.status in TERMINAL), task.status
        if task.cancel_requested:
            assert task.status in (S.RUNNING, S.CANCELLED, S.SUCCEEDED)

    @staticmethod
    def _check_dependencies(task: Task, statuses: set[str]) -> None:
        if task.status in (S.QUEUED, S.RUNNING):
            assert statuses <= {S.SUCCEEDED}
        if task.status == S.PENDING:  # waiting for something that can still succeed: never stuck
            assert statuses - {S.SUCCEEDED}
            assert not statuses & {S.FAILED, S.CANCELLED}

    def _check_events(self, task: Task, events: list[TaskEvent]) -> None:
        assert [e.seq for e in events] == list(range(1, task.event_seq + 1))
        history = status_history(events)
        assert history[-1] == task.status
        seen = self.observed.setdefault(task.pk, [])
        if not seen or seen[-1] != task.status:
            seen.append(task.status)
        remaining = iter(history)
        assert all(status in remaining for status in seen), (seen, history)  # a subsequence


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_state_machine_holds_under_random_actions(require_postgres, repository):
    TaskMachine.repository = repository
    run_state_machine_as_test(
        TaskMachine,
        settings=settings(
            max_examples=35,
            stateful_step_count=25,
            deadline=None,
            database=None,  # no .hypothesis folder in the repository
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# --- the API ----------------------------------------------------------------------------------------
def _made(repository, user, **kwargs) -> Task:
    return services.task_create(title="t", instructions="i", repository=repository, owner=user, **kwargs)


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["pending", "queued", "running"])
def test_api_retry_of_an_active_task_is_a_409_naming_its_status(api, user, repository, status):
    blocker = _made(repository, user)
    task = _made(repository, user, depends_on=[blocker] if status == "pending" else [])
    if status == "running":
        services.task_claim(runner_id="r1", task_id=task.pk)
    before = snapshot()
    response = api.post(f"/api/tasks/{task.pk}/retry/")
    assert response.status_code == 409, response.content
    body = response.json()
    assert body["code"] == "invalid_transition"
    assert body["detail"] == f"cannot retry a {status} task: only failed or cancelled tasks can be retried"
    assert snapshot() == before  # no event, no update


@pytest.mark.django_db
def test_api_cancel_of_a_finished_task_is_a_409(api, user, repository):
    task = _made(repository, user)
    _, attempt = services.task_claim(runner_id="r1")
    services.task_finish(task_id=task.pk, attempt_id=attempt.pk, status=S.SUCCEEDED)
    before = snapshot()
    response = api.post(f"/api/tasks/{task.pk}/cancel/")
    assert response.status_code == 409, response.content
    assert response.json()["detail"].startswith("cannot cancel a succeeded task")
    assert snapshot() == before


@pytest.mark.django_db
def test_api_retry_then_cancel_of_a_running_task_ends_cancelled_when_its_attempt_finishes(api, user, repository):
    """The reported bug: retry on a running task answered 200 and requeued it while its runner
    went on; the later cancel was then overwritten when the old attempt finished."""
    task = _made(repository, user)
    _, attempt = services.task_claim(runner_id="r1")
    assert api.post(f"/api/tasks/{task.pk}/retry/").status_code == 409
    cancel = api.post(f"/api/tasks/{task.pk}/cancel/")
    assert cancel.status_code == 200
    assert cancel.json()["status"] == "running" and cancel.json()["cancel_requested"] is True
    # The runner's attempt ends with a transient failure asking for a requeue.
    services.task_finish(
        task_id=task.pk, attempt_id=attempt.pk, status=S.FAILED, failure_reason="llm_error", retry=True
    )
    body = api.get(f"/api/tasks/{task.pk}/").json()
    assert body["status"] == "cancelled" and body["failure_reason"] == "cancelled"
    assert body["finished_at"] is not None
    assert services.task_claim(runner_id="r2") is None  # nothing was queued again
    types = [e["type"] for e in api.get(f"/api/tasks/{task.pk}/events/").json()]
    assert types == ["created", "status", "claimed", "cancel_requested", "status"]
