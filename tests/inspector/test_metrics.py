"""/metrics: who may scrape it, and what it says about real runs in Prometheus' text format."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.authtoken.models import Token

from registry import services as registry
from repopool.models import Slot

pytestmark = pytest.mark.django_db(transaction=True)


def samples(body: bytes) -> dict[tuple[str, tuple], float]:
    parsed = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            parsed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return parsed


def token_client(user) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")


def test_access_per_role(alice, staff, settings):
    settings.AGENTRUNNER_METRICS_ALLOWED_NETWORKS = []
    anonymous = Client().get("/metrics")
    assert anonymous.status_code == 401 and anonymous["WWW-Authenticate"] == "Token"
    assert Client(HTTP_AUTHORIZATION="Token not-a-token").get("/metrics").status_code == 401

    plain = Client()
    plain.force_login(alice)
    assert plain.get("/metrics").status_code == 403
    assert token_client(alice).get("/metrics").status_code == 403

    assert token_client(staff).get("/metrics").status_code == 200
    session = Client()
    session.force_login(staff)
    response = session.get("/metrics")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain; version=")
    assert session.post("/metrics").status_code == 405


def test_allowed_scraper_address(settings):
    settings.AGENTRUNNER_METRICS_ALLOWED_NETWORKS = ["10.0.0.0/8", "not-a-network", "192.0.2.7"]
    assert Client(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="192.0.2.7").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="192.0.2.8").get("/metrics").status_code == 401
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 401


def test_metrics_describe_real_runs(succeeded_run, failed_run, staff, tmp_path):
    from tests.inspector.runs import demo_repository

    waiting = registry.task_create(title="Waits", instructions="x", repository=demo_repository(tmp_path, name="idle"))
    assert waiting.status == "queued"
    # Replays spend nothing (their recorded cost is not counted); a real call's cost is.
    registry.task_add_usage(task_id=waiting.pk, prompt_tokens=0, completion_tokens=0, cost_usd=Decimal("0.25"))
    values = samples(token_client(staff).get("/metrics").content)

    assert values[("agentrunner_tasks", (("status", "succeeded"),))] == 1
    assert values[("agentrunner_tasks", (("status", "failed"),))] == 1
    assert values[("agentrunner_tasks", (("status", "queued"),))] == 1
    assert values[("agentrunner_tasks_finished_total", (("reason", ""), ("status", "succeeded")))] == 1
    assert values[("agentrunner_tasks_finished_total", (("reason", "tests_failed"), ("status", "failed")))] == 1
    assert values[("agentrunner_queue_depth", ())] == 1
    assert values[("agentrunner_oldest_queued_age_seconds", ())] > 0

    # Both attempts ran every phase: the histogram counts two of each, its buckets are cumulative.
    for phase in ("allocate", "agent", "tests", "commit", "artifacts"):
        assert values[("agentrunner_phase_duration_seconds_count", (("phase", phase),))] == 2
        assert values[("agentrunner_phase_duration_seconds_bucket", (("le", "+Inf"), ("phase", phase)))] == 2
        assert values[("agentrunner_phase_duration_seconds_sum", (("phase", phase),))] > 0
    buckets = [
        values[("agentrunner_phase_duration_seconds_bucket", (("le", le), ("phase", "agent")))]
        for le in ("0.1", "1.0", "10.0", "3600.0")
    ]
    assert buckets == sorted(buckets) and buckets[-1] == 2

    # Two replays of the shipped conversation: 2 x (4,500 prompt + 240 completion) tokens.
    assert values[("agentrunner_llm_tokens_total", (("kind", "prompt"), ("model", "gpt-4o-mini")))] == 9000
    assert values[("agentrunner_llm_tokens_total", (("kind", "completion"), ("model", "gpt-4o-mini")))] == 480
    assert values[("agentrunner_llm_cost_usd_total", (("model", "gpt-4o-mini"),))] == pytest.approx(0.25)

    assert Slot.objects.filter(repository__name="demo-sample").count() == 1
    assert values[("agentrunner_slots", (("repository", "demo-sample"), ("state", "free")))] == 1
    assert values[("agentrunner_slots", (("repository", "demo-sample"), ("state", "leased")))] == 0
