from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from agentrunner.api import HealthView

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
    path("api/", include("registry.urls")),
    path("api/", include("repopool.urls")),
    path("api/", include("artifacts.urls")),
]
