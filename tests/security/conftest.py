from __future__ import annotations

from tests.runner.conftest import llm, sample_repo  # noqa: F401  (the runner's fixtures, reused)
from tests.runners.conftest import claimed, queued_task, repo, runner, runner_token  # noqa: F401  (the runner API's)
