from __future__ import annotations

import pytest

from agentrunner.llm.client import LLMClient, Transcript
from agentrunner.llm.config import LLMConfig
from tests.llm_server import LLMServer


@pytest.fixture
def llm_server():
    server = LLMServer(api_key="sk-test-secret-key-123456").start()
    yield server
    server.stop()


@pytest.fixture
def make_client(llm_server, tmp_path):
    sleeps: list[float] = []

    def make(transcript_path=None, **overrides) -> LLMClient:
        config = LLMConfig(
            api_key="sk-test-secret-key-123456",
            base_url=llm_server.base_url,
            model="test-model",
            request_timeout=overrides.pop("request_timeout", 5.0),
            backoff_base=0.01,
            backoff_max=0.05,
            prices={"test-model": ("1.00", "2.00")},
            **overrides,
        )
        transcript = Transcript(transcript_path, secret=config.api_key)
        return LLMClient(config, transcript=transcript, sleep=lambda s: (sleeps.append(s), __import__("time").sleep(s)))

    make.sleeps = sleeps
    return make
