from __future__ import annotations

from tests.runner.conftest import llm, sample_repo  # noqa: F401  (the runner's fixtures, reused)
