from __future__ import annotations

from rest_framework.routers import SimpleRouter

from registry.api import TaskViewSet

router = SimpleRouter()
router.register("tasks", TaskViewSet, basename="task")
urlpatterns = router.urls
