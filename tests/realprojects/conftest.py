from __future__ import annotations

import pytest

from tests.conftest import require_service
from tests.realprojects.projects import FetchError, Project, cache_dir, fetch
from tests.runner.conftest import llm  # noqa: F401  (the scripted model server)


@pytest.fixture
def fetched():
    """The project's archive from the cache (downloaded when missing); offline, a skip with the
    reason, or a failure where services are required (CI)."""

    def get(project: Project):
        try:
            return fetch(project)
        except FetchError as exc:
            require_service(
                f"the {project.registry} registry",
                False,
                f"could not fetch {project.package} into {cache_dir()}: {exc}",
            )

    return get
