from __future__ import annotations

import sys

import pytest

from repopool import services as pool
from tests.llm_server import LLMServer, tool

API_KEY = "sk-runner-secret-0123456789abcdef"
TEST_COMMAND = f"{sys.executable} -m pytest -q -p no:cacheprovider"


@pytest.fixture
def llm(settings):
    server = LLMServer(api_key=API_KEY).start()
    settings.OPENAI_API_KEY = API_KEY
    settings.OPENAI_BASE_URL = server.base_url
    settings.AGENTRUNNER_LLM_PROVIDER = "openai"
    settings.AGENTRUNNER_LLM_MODEL = "test-model"
    settings.AGENTRUNNER_LLM_PRICES = {"test-model": ["1.00", "2.00"]}
    settings.AGENTRUNNER_LLM_MAX_RETRIES = 2
    settings.AGENTRUNNER_LLM_BACKOFF_BASE = 0.01
    settings.AGENTRUNNER_LLM_TIMEOUT = 10
    settings.AGENTRUNNER_SLOT_WAIT_SECONDS = 0.2
    yield server
    server.stop()


def fixer(request):
    """A scripted agent that fixes the sample project: edit calc.py, run the tests, finish."""
    done = [m for m in request["messages"] if m["role"] == "tool"]
    if not done:
        return tool("edit_file", path="calc.py", old_text="a - b", new_text="a + b")
    if len(done) == 1:
        return tool("run_tests", args=["-x"])
    return tool("finish", summary="add() now adds")


@pytest.fixture
def sample_repo(db, make_repo):
    return pool.repository_create(
        name="sample", url=str(make_repo()), pool_size=2, test_command=TEST_COMMAND, keep_paths=[".venv"]
    )
