"""``/metrics`` for Prometheus, computed from the database at scrape time.

Every gunicorn worker answers the same numbers because none are kept in process memory: a custom
collector runs a handful of aggregate queries per scrape (counts by status, by reason, sums by
model, a phase-duration histogram bucketed in SQL)."""

from __future__ import annotations

import ipaddress
import logging

from django.conf import settings
from django.db import connection
from django.db.models import Count, F, FloatField, Min, Q, Sum, Value
from django.db.models.fields.json import KeyTextTransform, KeyTransform
from django.db.models.functions import Cast, Coalesce, NullIf
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from common.permissions import is_staff
from inspector.present import PHASE_ORDER
from registry.models import Attempt, Task
from registry.states import TERMINAL, TaskStatus

log = logging.getLogger(__name__)

PHASE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class DatabaseCollector:
    """Reads the registry and the pool each time Prometheus scrapes."""

    def collect(self):
        yield from self._tasks()
        yield from self._phases()
        yield from self._llm()
        yield from self._slots()

    def _tasks(self):
        by_status = GaugeMetricFamily("agentrunner_tasks", "Tasks by current status.", labels=["status"])
        counts = {row["status"]: row["n"] for row in Task.objects.order_by().values("status").annotate(n=Count("pk"))}
        for status in TaskStatus.values:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status

        finished = CounterMetricFamily(
            "agentrunner_tasks_finished",
            "Tasks in a final status, by status and failure reason.",
            labels=["status", "reason"],
        )
        rows = (
            Task.objects.filter(status__in=TERMINAL)
            .order_by()
            .values("status", "failure_reason")
            .annotate(n=Count("pk"))
        )
        for row in rows:
            finished.add_metric([row["status"], row["failure_reason"] or ""], row["n"])
        yield finished

        yield GaugeMetricFamily(
            "agentrunner_queue_depth", "Tasks queued and waiting for a runner.", value=counts.get(TaskStatus.QUEUED, 0)
        )
        oldest = Task.objects.filter(status=TaskStatus.QUEUED).aggregate(oldest=Min("queued_at"))["oldest"]
        age = (timezone.now() - oldest).total_seconds() if oldest else 0.0
        yield GaugeMetricFamily(
            "agentrunner_oldest_queued_age_seconds", "Age of the oldest queued task (0 when none).", value=age
        )

    def _phases(self):
        family = HistogramMetricFamily(
            "agentrunner_phase_duration_seconds", "Duration of each phase of finished attempts.", labels=["phase"]
        )
        rows = _phase_rows_postgres() if connection.vendor == "postgresql" else _phase_rows_portable()
        for phase, count, total, cumulative in rows:
            if not count:
                continue
            buckets = [(floatToGoString(bound), n) for bound, n in zip(PHASE_BUCKETS, cumulative, strict=True)]
            buckets.append(("+Inf", count))
            family.add_metric([phase], buckets, float(total or 0))
        yield family

    def _llm(self):
        tokens = CounterMetricFamily(
            "agentrunner_llm_tokens", "LLM tokens used, by model and kind.", labels=["model", "kind"]
        )
        cost = CounterMetricFamily("agentrunner_llm_cost_usd", "LLM cost in US dollars, by model.", labels=["model"])
        model = Coalesce(NullIf(F("llm_model"), Value("")), Value(settings.AGENTRUNNER_LLM_MODEL))
        rows = (
            Task.objects.order_by()
            .annotate(model=model)
            .values("model")
            .annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), cost=Sum("cost_usd"))
        )
        for row in rows:
            tokens.add_metric([row["model"], "prompt"], row["prompt"] or 0)
            tokens.add_metric([row["model"], "completion"], row["completion"] or 0)
            cost.add_metric([row["model"]], float(row["cost"] or 0))
        yield tokens
        yield cost

    def _slots(self):
        from repopool.models import Slot, SlotState

        family = GaugeMetricFamily(
            "agentrunner_slots", "Working-copy slots by repository and state.", labels=["repository", "state"]
        )
        rows = Slot.objects.order_by().values("repository__name", "state").annotate(n=Count("pk"))
        seen = {(row["repository__name"], row["state"]): row["n"] for row in rows}
        for name in sorted({name for name, _ in seen}):
            for state in SlotState.values:
                family.add_metric([name, state], seen.get((name, state), 0))
        yield family


def _phase_rows_postgres() -> list[tuple[str, int, float, list[int]]]:
    """One pass over finished attempts: every phase of every attempt, grouped by bucket in SQL.

    ``width_bucket(-seconds, negated bounds ascending)`` counts the bounds at or above a value,
    which gives Prometheus' ``le`` (<=) buckets exactly; Python makes them cumulative."""
    negated = ",".join(f"{-bound:g}" for bound in reversed(PHASE_BUCKETS))
    sql = (
        f"SELECT phase, width_bucket(-seconds, ARRAY[{negated}]::float8[]) AS above, count(*), sum(seconds) FROM ("
        "  SELECT p.key AS phase, (p.value #>> '{}')::float8 AS seconds"
        f"  FROM {Attempt._meta.db_table} a, jsonb_each(a.metrics -> 'phases') p"
        "  WHERE a.finished_at IS NOT NULL AND jsonb_typeof(a.metrics -> 'phases') = 'object'"
        "    AND jsonb_typeof(p.value) = 'number'"
        ") t GROUP BY 1, 2"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql)
        fetched = cursor.fetchall()
    bounds = len(PHASE_BUCKETS)
    totals: dict[str, list] = {}
    for phase, above, count, total in fetched:
        entry = totals.setdefault(phase, [0, 0.0, [0] * bounds])
        entry[0] += count
        entry[1] += float(total or 0)
        # A value under ``above`` of the bounds is counted in the buckets of those bounds (the top ones).
        for index in range(bounds - above, bounds):
            entry[2][index] += count
    order = PHASE_ORDER + sorted(p for p in totals if p not in PHASE_ORDER)
    return [(p, totals[p][0], totals[p][1], totals[p][2]) for p in order if p in totals]


def _phase_rows_portable() -> list[tuple[str, int, float, list[int]]]:
    """The same through the ORM's JSON lookups (SQLite on a laptop): the known phases only."""
    phases_json = KeyTransform("phases", "metrics")
    aggregates = {}
    for phase in PHASE_ORDER:
        value = Cast(KeyTextTransform(phase, phases_json), FloatField())
        aggregates[f"{phase}__count"] = Count("pk", filter=Q(**{f"metrics__phases__{phase}__isnull": False}))
        aggregates[f"{phase}__sum"] = Coalesce(Sum(value), Value(0.0))
        for index, bound in enumerate(PHASE_BUCKETS):
            aggregates[f"{phase}__b{index}"] = Count("pk", filter=Q(**{f"metrics__phases__{phase}__lte": bound}))
    row = Attempt.objects.filter(finished_at__isnull=False).order_by().aggregate(**aggregates)
    return [
        (
            phase,
            row[f"{phase}__count"] or 0,
            row[f"{phase}__sum"] or 0.0,
            [row[f"{phase}__b{i}"] or 0 for i in range(len(PHASE_BUCKETS))],
        )
        for phase in PHASE_ORDER
    ]


def render() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    return generate_latest(registry)


# --- access -------------------------------------------------------------------------------------
def _address_allowed(address: str) -> bool:
    networks = getattr(settings, "AGENTRUNNER_METRICS_ALLOWED_NETWORKS", [])
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for network in networks:
        try:
            if ip in ipaddress.ip_network(network, strict=False):
                return True
        except ValueError:
            log.warning("AGENTRUNNER_METRICS_ALLOWED_NETWORKS: %r is not an address or network", network)
    return False


def _token_user(request: HttpRequest):
    """The user of an ``Authorization: Token <key>`` (or ``Bearer <key>``) header, if valid."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() not in ("token", "bearer") or not key.strip():
        return None
    from rest_framework.authtoken.models import Token

    token = Token.objects.select_related("user").filter(key=key.strip()).first()
    return token.user if token and token.user.is_active else None


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Staff (session or API token) or an allowed scraper address; 401 anonymous, 403 others."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponse("GET only\n", status=405, content_type="text/plain", headers={"Allow": "GET, HEAD"})
    user = _token_user(request) or request.user
    allowed = is_staff(user) or _address_allowed(request.META.get("REMOTE_ADDR", ""))
    if not allowed:
        if user is None or not user.is_authenticated:
            return HttpResponse(
                "authentication required: a staff API token (Authorization: Token <key>) or an allowed address\n",
                status=401,
                content_type="text/plain",
                headers={"WWW-Authenticate": "Token"},
            )
        return HttpResponse("only staff may read the metrics\n", status=403, content_type="text/plain")
    return HttpResponse(render(), content_type=CONTENT_TYPE_LATEST)
