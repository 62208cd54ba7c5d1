from __future__ import annotations

from rest_framework.routers import SimpleRouter

from repopool.api import RepositoryViewSet, SlotViewSet

router = SimpleRouter()
router.register("repositories", RepositoryViewSet, basename="repository")
router.register("slots", SlotViewSet, basename="slot")
urlpatterns = router.urls
