"""A renew without a length keeps the lease's own length (the one given at allocation).
Slots are an operators' API: the HTTP tests use a staff token."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from repopool import services
from repopool.errors import StaleLease
from repopool.models import Slot

pytestmark = pytest.mark.django_db


def seconds_left(expires) -> float:
    return (expires - timezone.now()).total_seconds()


def test_renew_over_http_without_lease_seconds_keeps_the_allocated_length(staff_api, repository):
    lease = staff_api.post("/api/slots/allocate/", {"repository": "sample", "holder": "curl", "lease_seconds": 600})
    assert lease.status_code == 201, lease.content
    body = lease.json()
    renewed = staff_api.post(f"/api/slots/{body['id']}/renew/", {"lease_token": body["lease_token"]})
    assert renewed.status_code == 200, renewed.content
    left = seconds_left(parse_datetime(renewed.json()["lease_expires_at"]))
    assert 590 < left <= 600  # was stretched to an hour
    assert Slot.objects.get(pk=body["id"]).lease_seconds == 600


def test_an_explicit_length_still_wins_and_the_next_default_renew_returns_to_the_allocated_one(staff_api, repository):
    lease = staff_api.post(
        "/api/slots/allocate/", {"repository": "sample", "holder": "curl", "lease_seconds": 300}
    ).json()
    longer = staff_api.post(
        f"/api/slots/{lease['id']}/renew/", {"lease_token": lease["lease_token"], "lease_seconds": 900}
    )
    assert 890 < seconds_left(parse_datetime(longer.json()["lease_expires_at"])) <= 900
    again = staff_api.post(f"/api/slots/{lease['id']}/renew/", {"lease_token": lease["lease_token"]})
    assert 290 < seconds_left(parse_datetime(again.json()["lease_expires_at"])) <= 300


def test_each_lease_has_its_own_length_grown_or_reused(repository):
    grown = services.slot_allocate(repository=repository, holder="a", lease_seconds=120)  # clones a new slot
    assert 110 < seconds_left(services.slot_renew(slot_id=grown.slot_id, lease_token=grown.lease_token)) <= 120
    services.slot_release(slot_id=grown.slot_id, lease_token=grown.lease_token)
    reused = services.slot_allocate(repository=repository, holder="b", lease_seconds=45)  # the free slot again
    assert reused.slot_id == grown.slot_id
    assert 35 < seconds_left(services.slot_renew(slot_id=reused.slot_id, lease_token=reused.lease_token)) <= 45


def test_a_stale_token_is_still_refused_and_changes_nothing(repository):
    lease = services.slot_allocate(repository=repository, holder="a", lease_seconds=60)
    before = Slot.objects.get(pk=lease.slot_id).lease_expires_at
    with pytest.raises(StaleLease) as refused:
        services.slot_renew(slot_id=lease.slot_id, lease_token="00000000-0000-0000-0000-000000000000")
    assert refused.value.field == "lease_token"
    assert Slot.objects.get(pk=lease.slot_id).lease_expires_at == before


def test_a_lease_from_before_lengths_were_stored_renews_for_an_hour(repository):
    lease = services.slot_allocate(repository=repository, holder="a", lease_seconds=60)
    Slot.objects.filter(pk=lease.slot_id).update(
        lease_seconds=None, lease_expires_at=timezone.now() + timedelta(seconds=60)
    )
    expires = services.slot_renew(slot_id=lease.slot_id, lease_token=lease.lease_token)
    assert 3590 < seconds_left(expires) <= 3600
