from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from agentrunner.api import HealthView
from common.drf import api_not_found
from inspector.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/health/", HealthView.as_view(), name="health"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path(
        "api/redoc/",
        # Our template drops the web fonts the stock one loads from a CDN: docs work offline.
        SpectacularRedocView.as_view(url_name="schema", template_name="agentrunner/redoc.html"),
        name="redoc",
    ),
    path("api/runner/v1/", include("runners.urls")),
    path("api/", include("registry.urls")),
    path("api/", include("repopool.urls")),
    path("api/", include("artifacts.urls")),
    path("", include("inspector.urls")),
    path("metrics", metrics_view, name="metrics"),
    re_path(r"^api/(?P<path>.*)$", api_not_found),  # last: JSON 404 for every other /api/ path
]

handler400 = "common.drf.bad_request"
handler500 = "common.drf.server_error"
