from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from tests.inspector.runs import FAILING_TESTS, demo_repository, replay_run


@pytest.fixture
def alice(db):
    return get_user_model().objects.create_user(username="alice", password="pw-alice-123")


@pytest.fixture
def bob(db):
    return get_user_model().objects.create_user(username="bob", password="pw-bob-123")


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user(username="root", password="pw-root-123", is_staff=True)


@pytest.fixture
def succeeded_run(db, tmp_path, alice):
    task = replay_run(demo_repository(tmp_path), owner=alice)
    assert task.status == "succeeded", (task.failure_reason, task.failure_message)
    return task


@pytest.fixture
def failed_run(db, tmp_path, alice):
    task = replay_run(demo_repository(tmp_path, name="broken-tests", test_command=FAILING_TESTS), owner=alice)
    assert task.status == "failed", task.status
    return task
