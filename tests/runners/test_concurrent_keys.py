"""Two deliveries of one request at the same moment (a retry racing the original): one effect."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from registry.models import Task, TaskEvent
from tests.runners.conftest import RunnerClient, claim

pytestmark = pytest.mark.django_db(transaction=True)


def test_same_key_at_once_appends_once(runner_token, queued_task, require_postgres):
    claimed = claim(RunnerClient(runner_token[1]))
    body = {"events": [{"type": "step", "message": str(i)} for i in range(20)]}
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "cost_usd": "0.25"}
    barrier = threading.Barrier(6)
    answers: list[tuple[int, dict]] = []

    def deliver(path, payload, key):
        client = RunnerClient(runner_token[1])
        barrier.wait()
        try:
            response = client.post(path, payload, key=key, lease=claimed.lease)
            answers.append((response.status_code, response.json()))
        finally:
            connection.close()

    a = claimed.attempt_id
    threads = [threading.Thread(target=deliver, args=(f"attempts/{a}/events/", body, "same-events")) for _ in range(3)]
    threads += [threading.Thread(target=deliver, args=(f"attempts/{a}/usage/", usage, "same-usage")) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(status for status, _ in answers) == [200] * 6, answers
    event_answers = [body for _, body in answers if "appended" in body]
    assert len({str(answer) for answer in event_answers}) == 1  # all three got the one answer
    assert TaskEvent.objects.filter(task_id=claimed.task_id, type="step").count() == 20
    task = Task.objects.get(pk=claimed.task_id)
    assert (task.prompt_tokens, str(task.cost_usd)) == (5, "0.250000")
