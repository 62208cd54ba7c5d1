"""What one runner request costs the server: a heartbeat writes the attempt row only when there is
news or the last write is a third of the staleness limit old; a token is looked up by its sha256
in one indexed query and its last_used_at is written at most once a minute."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from registry.models import Attempt
from runners import services as runners
from runners.models import RunnerToken

pytestmark = pytest.mark.django_db


def _beat(runner, claimed, body=None):
    response = runner.post(f"attempts/{claimed.attempt_id}/heartbeat/", body or {}, key=None, lease=claimed.lease)
    assert response.status_code == 200, response.content
    return Attempt.objects.get(pk=claimed.attempt_id)


def test_heartbeats_write_the_row_only_when_due_or_with_news(runner, claimed, settings):
    settings.AGENTRUNNER_ATTEMPT_STALE_SECONDS = 300
    settings.AGENTRUNNER_LEASE_SECONDS = 300  # a write is due every 100 s
    claimed_at = Attempt.objects.get(pk=claimed.attempt_id).heartbeat_at
    assert _beat(runner, claimed).heartbeat_at == claimed_at  # just claimed: nothing to write
    with_news = _beat(runner, claimed, {"metrics": {"step": 2}})
    assert with_news.metrics == {"step": 2} and with_news.heartbeat_at > claimed_at
    old = timezone.now() - timedelta(seconds=101)
    Attempt.objects.filter(pk=claimed.attempt_id).update(heartbeat_at=old)
    assert _beat(runner, claimed).heartbeat_at > old  # due: written


def test_a_heartbeat_still_keeps_an_attempt_from_the_reaper(runner, claimed, settings):
    from registry import services as registry

    settings.AGENTRUNNER_ATTEMPT_STALE_SECONDS = 3
    settings.AGENTRUNNER_LEASE_SECONDS = 3  # a write is due every second
    Attempt.objects.filter(pk=claimed.attempt_id).update(heartbeat_at=timezone.now() - timedelta(seconds=2))
    _beat(runner, claimed)
    assert registry.attempts_reap_lost(stale_after_seconds=3) == []


def test_token_lookup_is_one_query_and_last_used_is_written_once_a_minute(runner_token):
    token, raw = runner_token
    assert any(f.name == "token_hash" and f.unique for f in RunnerToken._meta.fields)  # an index
    with CaptureQueriesContext(connection) as first:
        runners.runner_token_authenticate(raw=raw)
    assert len(first) == 2  # the lookup, and last_used_at (never written yet)
    used = RunnerToken.objects.get(pk=token.pk).last_used_at
    with CaptureQueriesContext(connection) as again:
        runners.runner_token_authenticate(raw=raw)
    assert len(again) == 1 and "token_hash" in again[0]["sql"]
    assert RunnerToken.objects.get(pk=token.pk).last_used_at == used
    RunnerToken.objects.filter(pk=token.pk).update(last_used_at=used - timedelta(seconds=61))
    runners.runner_token_authenticate(raw=raw)
    assert RunnerToken.objects.get(pk=token.pk).last_used_at > used - timedelta(seconds=61)
