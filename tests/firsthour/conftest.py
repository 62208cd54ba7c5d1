from __future__ import annotations

# The runner's scripted LLM server and sample repository, shared with tests/runner/.
from tests.runner.conftest import llm, sample_repo  # noqa: F401
