"""Against the real OpenAI API: deselected by default (`-m "not live_llm"`), run with
`make test-live` when OPENAI_API_KEY is set. Never part of CI."""

from __future__ import annotations

import os

import pytest

from agentrunner.agent.loop import Agent, Budget
from agentrunner.agent.workspace import Workspace
from agentrunner.llm.client import LLMClient
from agentrunner.llm.config import LLMConfig

pytestmark = pytest.mark.live_llm


def test_real_model_fixes_a_function(tmp_path):
    if not os.environ.get("OPENAI_API_KEY"):
        pytest.fail("make test-live needs OPENAI_API_KEY")
    (tmp_path / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    config = LLMConfig(
        api_key=os.environ["OPENAI_API_KEY"],
        base_url=os.environ.get("OPENAI_BASE_URL") or None,
        model=os.environ.get("AGENTRUNNER_LLM_MODEL", "gpt-4o-mini"),
    )
    agent = Agent(client=LLMClient(config), workspace=Workspace(tmp_path))
    result = agent.start("calc.add subtracts; make it add. Do not run tests.", Budget(max_steps=10))
    assert result.ok, result.message
    assert "a + b" in (tmp_path / "calc.py").read_text().replace("b + a", "a + b")
