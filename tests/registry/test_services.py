from __future__ import annotations

import threading

import pytest
from django.db import close_old_connections, connection

from common.errors import DomainError
from registry import services
from registry.errors import AttemptLost, InvalidTransition
from registry.models import Attempt, Task, TaskEvent
from registry.states import MACHINE, Action, FailureReason, TaskStatus, next_status, refusal, sources


def make(repository, **kw):
    kw.setdefault("title", "t")
    kw.setdefault("instructions", "do it")
    return services.task_create(repository=repository, **kw)


@pytest.mark.django_db
def test_claim_takes_highest_priority_then_oldest(repository):
    low = make(repository, priority=0)
    high_old = make(repository, priority=5)
    high_new = make(repository, priority=5)
    order = [services.task_claim(runner_id="r")[0].pk for _ in range(3)]
    assert order == [high_old.pk, high_new.pk, low.pk]
    assert services.task_claim(runner_id="r") is None
    attempts = Attempt.objects.filter(task=high_old)
    assert [(a.number, a.runner_id) for a in attempts] == [(1, "r")]


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["one statement", "portable"])
def test_a_claim_with_no_live_model_takes_only_tasks_that_replay_a_transcript(repository, path):
    def claim(**kw):
        if path == "portable":  # SQLite's steps (run here on the test database)
            return services._claim_portable("r", kw.get("task_id"), kw.get("replay_only", False))
        return services.task_claim(runner_id="r", **kw)

    live = make(repository, priority=5)
    openai = make(repository, priority=5, llm_config={"provider": "openai"})
    replay = make(repository, llm_config={"provider": "replay", "replay_file": "/demo.json"})
    task, attempt = claim(replay_only=True)
    assert task.pk == replay.pk and attempt.number == 1
    assert claim(replay_only=True) is None  # the others need a model: left queued, attempts untouched
    assert list(Task.objects.filter(pk__in=[live.pk, openai.pk]).values_list("status", "attempts_count")) == [
        ("queued", 0),
        ("queued", 0),
    ]
    assert claim(task_id=live.pk, replay_only=True)[0].pk == live.pk  # one named is claimed as it is
    assert claim()[0].pk == openai.pk


@pytest.mark.django_db
def test_claim_named_task_refuses_one_that_is_not_queued(repository):
    a = make(repository)
    b = make(repository, depends_on=[a])
    with pytest.raises(InvalidTransition):
        services.task_claim(runner_id="r", task_id=b.pk)
    task, attempt = services.task_claim(runner_id="r", task_id=a.pk)
    assert task.pk == a.pk and task.status == "running" and attempt.number == 1


@pytest.mark.django_db
def test_dependencies_unblock_on_success_and_fail_on_failure(repository):
    a = make(repository)
    b = make(repository, depends_on=[a])
    c = make(repository, depends_on=[b])
    assert (b.status, c.status) == ("pending", "pending")
    _, attempt = services.task_claim(runner_id="r", task_id=a.pk)
    services.task_finish(task_id=a.pk, attempt_id=attempt.pk, status=TaskStatus.SUCCEEDED)
    b.refresh_from_db()
    assert b.status == "queued"
    _, attempt = services.task_claim(runner_id="r", task_id=b.pk)
    services.task_finish(task_id=b.pk, attempt_id=attempt.pk, status=TaskStatus.FAILED, failure_reason="tests_failed")
    c.refresh_from_db()
    assert c.status == "failed" and c.failure_reason == FailureReason.DEPENDENCY_FAILED
    assert str(b.pk) in c.failure_message
    # Retrying the failed dependency revives what failed because of it.
    services.task_retry(task_id=b.pk)
    c.refresh_from_db()
    assert c.status == "pending" and c.failure_reason == ""


@pytest.mark.django_db
def test_cancelling_a_dependency_fails_dependents_transitively(repository):
    a = make(repository)
    b = make(repository, depends_on=[a])
    c = make(repository, depends_on=[b])
    services.task_cancel(task_id=a.pk)
    assert Task.objects.get(pk=b.pk).failure_reason == "dependency_failed"
    assert Task.objects.get(pk=c.pk).failure_reason == "dependency_failed"


@pytest.mark.django_db
def test_transient_failure_requeues_while_attempts_remain(repository):
    task = make(repository, max_attempts=2)
    _, first = services.task_claim(runner_id="r")
    task = services.task_finish(
        task_id=task.pk, attempt_id=first.pk, status=TaskStatus.FAILED, failure_reason="llm_error", retry=True
    )
    assert task.status == "queued"
    _, second = services.task_claim(runner_id="r")
    task = services.task_finish(
        task_id=task.pk, attempt_id=second.pk, status=TaskStatus.FAILED, failure_reason="llm_error", retry=True
    )
    assert task.status == "failed" and task.failure_reason == "llm_error"
    assert [a.outcome for a in task.attempts.order_by("number")] == ["retry", "failed"]
    # A manual retry grants another attempt even after the budget was used.
    task = services.task_retry(task_id=task.pk)
    assert task.status == "queued" and task.max_attempts >= 3


@pytest.mark.django_db
def test_invalid_transitions_are_refused_and_not_applied(repository):
    task = make(repository)
    _, attempt = services.task_claim(runner_id="r")
    services.task_finish(task_id=task.pk, attempt_id=attempt.pk, status=TaskStatus.SUCCEEDED)
    events_before = TaskEvent.objects.filter(task=task).count()
    for service in (services.task_cancel, services.task_retry):
        with pytest.raises(InvalidTransition):
            service(task_id=task.pk)
    assert Task.objects.get(pk=task.pk).status == "succeeded"
    assert TaskEvent.objects.filter(task=task).count() == events_before


@pytest.mark.django_db
def test_lost_attempts_are_reaped_and_task_requeued(repository):
    task = make(repository, max_attempts=2)
    _, attempt = services.task_claim(runner_id="dead")
    Attempt.objects.filter(pk=attempt.pk).update(heartbeat_at="2000-01-01T00:00:00Z")
    reaped = services.attempts_reap_lost(stale_after_seconds=60)
    assert [a.pk for a in reaped] == [attempt.pk]
    attempt.refresh_from_db()
    task.refresh_from_db()
    assert attempt.outcome == "lost" and task.status == "queued"


def _in_threads(count, target):
    errors = []
    barrier = threading.Barrier(count)

    def run(i):
        try:
            barrier.wait()
            target(i)
        except Exception as exc:  # collected and re-raised in the test thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close_old_connections()
    assert not errors, errors


@pytest.mark.django_db(transaction=True)
def test_concurrent_claimers_never_share_a_task(require_postgres, repository):
    tasks = {make(repository, priority=i % 3).pk for i in range(40)}
    claimed: list[tuple[int, object]] = []
    lock = threading.Lock()

    def claimer(i):
        while True:
            got = services.task_claim(runner_id=f"runner-{i}")
            if got is None:
                return
            with lock:
                claimed.append((i, got[0].pk))

    _in_threads(8, claimer)
    ids = [task_id for _, task_id in claimed]
    assert len(ids) == len(set(ids)) == 40
    assert set(ids) == tasks
    assert len({i for i, _ in claimed}) > 1  # really concurrent: several runners won some
    assert Attempt.objects.count() == 40


@pytest.mark.django_db(transaction=True)
def test_concurrent_event_appends_get_unique_increasing_seq(require_postgres, repository):
    task = make(repository)
    start = Task.objects.get(pk=task.pk).event_seq

    def appender(i):
        for n in range(25):
            services.event_append(task_id=task.pk, type="progress", data={"writer": i, "n": n})

    _in_threads(8, appender)
    seqs = list(TaskEvent.objects.filter(task=task).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, start + 8 * 25 + 1))
    # Each writer's own events appear in the order it wrote them.
    for writer in range(8):
        ns = [
            e.data["n"]
            for e in TaskEvent.objects.filter(task=task, type="progress").order_by("seq")
            if e.data["writer"] == writer
        ]
        assert ns == list(range(25))


@pytest.mark.django_db
def test_stale_queued_tasks_are_announced_again(repository):
    from registry.signals import task_queued

    task = make(repository)
    Task.objects.filter(pk=task.pk).update(queued_at="2000-01-01T00:00:00Z")
    fresh = make(repository)
    seen = []

    def receiver(sender, task_id, **kwargs):
        seen.append(task_id)

    task_queued.connect(receiver)
    try:
        assert services.tasks_requeue_stale(older_than_seconds=600) == [task.pk]
    finally:
        task_queued.disconnect(receiver)
    assert seen == [task.pk] and fresh.pk not in seen
    task.refresh_from_db()
    assert task.status == "queued" and task.queued_at.year > 2000  # the clock restarts


def _row(task_id):
    """The task row and its event count: what a refused action must leave as it was."""
    return Task.objects.filter(pk=task_id).values().get(), TaskEvent.objects.filter(task_id=task_id).count()


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["pending", "queued", "running"])
def test_retry_is_refused_on_an_active_task_and_changes_nothing(repository, status):
    blocker = make(repository)
    task = make(repository, depends_on=[blocker] if status == "pending" else [])
    if status == "running":
        services.task_claim(runner_id="r", task_id=task.pk)
    before = _row(task.pk)
    with pytest.raises(InvalidTransition) as refused:
        services.task_retry(task_id=task.pk)
    assert refused.value.message == (f"cannot retry a {status} task: only failed or cancelled tasks can be retried")
    assert _row(task.pk) == before


@pytest.mark.django_db
@pytest.mark.parametrize("end", ["succeeded", "failed", "cancelled"])
def test_cancel_is_refused_on_a_finished_task(repository, end):
    task = make(repository)
    _, attempt = services.task_claim(runner_id="r")
    services.task_finish(task_id=task.pk, attempt_id=attempt.pk, status=end)
    before = _row(task.pk)
    with pytest.raises(InvalidTransition) as refused:
        services.task_cancel(task_id=task.pk)
    assert refused.value.message == (
        f"cannot cancel a {end} task: only pending, queued or running tasks can be cancelled"
    )
    assert _row(task.pk) == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    "status, retry",
    [("failed", True), ("failed", False), ("cancelled", False)],
)
def test_a_cancel_request_ends_the_task_cancelled_whatever_the_attempt_reports(repository, status, retry):
    task = make(repository, max_attempts=3)
    _, attempt = services.task_claim(runner_id="r")
    task = services.task_cancel(task_id=task.pk)
    assert task.status == "running" and task.cancel_requested
    task = services.task_finish(
        task_id=task.pk, attempt_id=attempt.pk, status=status, failure_reason="llm_error", retry=retry
    )
    assert task.status == "cancelled" and task.failure_reason == "cancelled" and task.finished_at is not None
    attempt.refresh_from_db()
    assert attempt.outcome == status  # the attempt keeps what its runner reported
    assert services.task_claim(runner_id="r") is None  # not requeued


@pytest.mark.django_db
def test_a_cancel_request_does_not_undo_a_success(repository):
    task = make(repository)
    _, attempt = services.task_claim(runner_id="r")
    services.task_cancel(task_id=task.pk)
    task = services.task_finish(task_id=task.pk, attempt_id=attempt.pk, status="succeeded")
    assert task.status == "succeeded"


@pytest.mark.django_db
def test_a_lost_attempt_with_a_cancel_request_ends_cancelled(repository):
    task = make(repository, max_attempts=3)
    _, attempt = services.task_claim(runner_id="dead")
    services.task_cancel(task_id=task.pk)
    assert [a.pk for a in services.attempts_reap_lost(stale_after_seconds=0)] == [attempt.pk]
    task.refresh_from_db()
    assert task.status == "cancelled" and task.failure_reason == "cancelled"


@pytest.mark.django_db
def test_cancelling_twice_records_one_request(repository):
    task = make(repository)
    services.task_claim(runner_id="r")
    services.task_cancel(task_id=task.pk)
    before = _row(task.pk)
    again = services.task_cancel(task_id=task.pk)
    assert again.cancel_requested and _row(task.pk)[1] == before[1]
    assert TaskEvent.objects.filter(task=task, type="cancel_requested").count() == 1


@pytest.mark.django_db
def test_retry_after_a_honoured_cancel_clears_the_request(repository):
    task = make(repository)
    _, attempt = services.task_claim(runner_id="r")
    services.task_cancel(task_id=task.pk)
    services.task_finish(task_id=task.pk, attempt_id=attempt.pk, status="cancelled")
    task = services.task_retry(task_id=task.pk)
    assert task.status == "queued" and not task.cancel_requested and task.finished_at is None
    _, second = services.task_claim(runner_id="r")
    task = services.task_finish(task_id=task.pk, attempt_id=second.pk, status="failed", retry=True)
    assert task.status == "queued"  # a fresh attempt's transient failure requeues again


@pytest.mark.django_db
def test_finish_is_fenced_by_the_attempt(repository):
    a = make(repository)
    b = make(repository)
    _, attempt_a = services.task_claim(runner_id="r", task_id=a.pk)
    services.task_claim(runner_id="r", task_id=b.pk)
    before = _row(b.pk)
    with pytest.raises(AttemptLost):  # another task's attempt cannot finish this one
        services.task_finish(task_id=b.pk, attempt_id=attempt_a.pk, status="succeeded")
    assert _row(b.pk) == before
    Attempt.objects.filter(pk=attempt_a.pk).update(heartbeat_at="2000-01-01T00:00:00Z")
    services.attempts_reap_lost(stale_after_seconds=60)
    _, newer = services.task_claim(runner_id="r2", task_id=a.pk)
    before = _row(a.pk)
    with pytest.raises(AttemptLost):  # the reaped runner comes back: its result is discarded
        services.task_finish(task_id=a.pk, attempt_id=attempt_a.pk, status="failed", retry=True)
    assert _row(a.pk) == before and newer.number == 2


@pytest.mark.django_db
def test_finish_refuses_a_status_that_is_not_an_end(repository):
    task = make(repository)
    _, attempt = services.task_claim(runner_id="r")
    with pytest.raises(DomainError) as refused:
        services.task_finish(task_id=task.pk, attempt_id=attempt.pk, status="pending")
    assert refused.value.field == "status"
    assert Task.objects.get(pk=task.pk).status == "running"


def test_the_table_refuses_what_it_must():
    assert next_status(Action.RETRY, "running") is None
    assert next_status(Action.REQUEUE, "running") == "pending"
    assert sources(Action.RETRY) == ["failed", "cancelled"]
    assert sources(Action.CANCEL, "cancelled") == ["pending", "queued"]
    assert refusal(Action.CLAIM, "pending") == "cannot claim a pending task: only queued tasks can be claimed"
    # Only the runner's and the reaper's actions leave running for pending.
    assert {action for (action, source), new in MACHINE.items() if (source, new) == ("running", "pending")} == {
        Action.REQUEUE
    }


@pytest.mark.django_db(transaction=True)
def test_a_cancel_racing_the_attempts_requeue_still_ends_cancelled(require_postgres, repository):
    """Whichever commits first, the user's cancel wins over the runner's requeue: either the
    finish sees the request and ends the task cancelled, or it requeues first and the cancel then
    ends the queued task at once. Never a queued task with its cancel request forgotten."""
    for _ in range(15):
        task = make(repository, max_attempts=5)
        _, attempt = services.task_claim(runner_id="r", task_id=task.pk)

        def act(i, task_id=task.pk, attempt_id=attempt.pk):
            if i == 0:
                services.task_cancel(task_id=task_id)
            else:
                services.task_finish(
                    task_id=task_id, attempt_id=attempt_id, status="failed", failure_reason="llm_error", retry=True
                )

        _in_threads(2, act)
        task.refresh_from_db()
        assert task.status == "cancelled", task.events.values_list("type", "message")
