from __future__ import annotations

from django.urls import path

from runners import api

app_name = "runners"
urlpatterns = [
    path("hosts/", api.HostsView.as_view(), name="hosts"),
    path("claim/", api.ClaimView.as_view(), name="claim"),
    path("attempts/<int:attempt_id>/heartbeat/", api.HeartbeatView.as_view(), name="heartbeat"),
    path("attempts/<int:attempt_id>/events/", api.EventsView.as_view(), name="events"),
    path("attempts/<int:attempt_id>/usage/", api.UsageView.as_view(), name="usage"),
    path("attempts/<int:attempt_id>/artifacts/", api.ArtifactUploadView.as_view(), name="artifacts"),
    path("attempts/<int:attempt_id>/artifact-links/", api.ArtifactLinkView.as_view(), name="artifact-links"),
    path("attempts/<int:attempt_id>/results/", api.ResultsView.as_view(), name="results"),
    path("attempts/<int:attempt_id>/finish/", api.FinishView.as_view(), name="finish"),
    path("slots/allocate/", api.SlotAllocateView.as_view(), name="slot-allocate"),
    path("slots/<int:slot_id>/prepared/", api.SlotPreparedView.as_view(), name="slot-prepared"),
    path("slots/<int:slot_id>/renew/", api.SlotRenewView.as_view(), name="slot-renew"),
    path("slots/<int:slot_id>/release/", api.SlotReleaseView.as_view(), name="slot-release"),
]
