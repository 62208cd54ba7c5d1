from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from agentrunner.llm.client import LLMClient
from agentrunner.llm.config import LLMConfig
from agentrunner.llm.errors import LLMError
from agentrunner.llm.pricing import cost_of
from tests.llm_server import Reply, completion, error

MESSAGES = [{"role": "user", "content": "hi"}]


def test_plain_completion_with_usage_cost_and_timing(make_client, llm_server):
    llm_server.add(completion("hello", usage=(1000, 500)))
    client = make_client()
    response = client.complete(MESSAGES, [])
    assert response.message == {"role": "assistant", "content": "hello"}
    assert (response.prompt_tokens, response.completion_tokens) == (1000, 500)
    assert response.cost == Decimal("0.002")  # 1000 * $1/M + 500 * $2/M
    assert response.duration > 0
    request = llm_server.requests[0]
    assert request["model"] == "test-model" and request["messages"] == MESSAGES
    assert llm_server.headers[0]["authorization"] == "Bearer sk-test-secret-key-123456"


def test_429_with_retry_after_is_honoured_then_succeeds(make_client, llm_server):
    llm_server.add(error(429, "slow down", headers={"Retry-After": "0.3"}), completion("ok"))
    retries = []
    client = make_client()
    started = time.monotonic()
    response = client.complete(MESSAGES, [], on_retry=lambda e, n, wait: retries.append((e.kind, n, wait)))
    assert response.message["content"] == "ok"
    assert retries == [("rate_limited", 1, 0.3)]
    assert time.monotonic() - started >= 0.3
    assert client.totals.retries == 1 and client.totals.failed_calls == 1


def test_retry_budget_bounds_the_wait_of_a_rate_limit(make_client, llm_server):
    llm_server.add(error(429, "slow down", headers={"Retry-After": "3600"}))
    client = make_client(max_retry_wait=1.0)
    started = time.monotonic()
    with pytest.raises(LLMError) as info:
        client.complete(MESSAGES, [])
    assert info.value.kind == "rate_limited" and "retry budget" in info.value.message
    assert time.monotonic() - started < 1.5


def test_repeated_500s_give_up_after_max_retries(make_client, llm_server):
    llm_server.add(*[error(500, "boom")] * 10)
    client = make_client(max_retries=3)
    reported = []
    with pytest.raises(LLMError) as info:
        client.complete(MESSAGES, [], on_retry=lambda e, n, w: reported.append(n))
    assert info.value.kind == "server_error" and info.value.retryable
    assert reported == [1, 2, 3] and len(llm_server.requests) == 4
    assert all(0.005 <= s <= 0.05 for s in make_client.sleeps)  # jittered exponential, capped


def test_reply_slower_than_the_timeout(make_client, llm_server):
    llm_server.add(Reply(body=completion("late"), delay=2.0), completion("on time"))
    client = make_client(request_timeout=0.5, max_retries=1)
    retries = []
    response = client.complete(MESSAGES, [], on_retry=lambda e, n, w: retries.append(e.kind))
    assert retries == ["timeout"] and response.message["content"] == "on time"


def test_connection_refused_is_retryable_then_fails(make_client):
    client = LLMClient(
        LLMConfig(api_key="k", base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_base=0.01, backoff_max=0.01)
    )
    with pytest.raises(LLMError) as info:
        client.complete(MESSAGES, [])
    assert info.value.kind == "connection"


def test_401_is_not_retried_and_never_shows_the_key(make_client, llm_server, tmp_path):
    path = tmp_path / "t.jsonl"
    client = make_client(path)
    client = LLMClient(
        LLMConfig(api_key="sk-wrong-key-abcdef123456", base_url=llm_server.base_url, model="test-model"),
        transcript=client.transcript,
    )
    llm_server.add(error(401, "Incorrect API key provided: sk-wrong-key-abcdef123456."))
    with pytest.raises(LLMError) as info:
        client.complete(MESSAGES, [])
    assert info.value.kind == "authentication" and not info.value.retryable
    assert len(llm_server.requests) == 1
    assert "sk-wrong" not in str(info.value)
    assert "sk-test-secret" not in path.read_text() and "sk-wrong" not in path.read_text()


def test_unknown_model_404(make_client, llm_server):
    llm_server.models = {"test-model"}
    with pytest.raises(LLMError) as info:
        make_client().complete(MESSAGES, [], model="no-such-model")
    assert info.value.kind == "model_not_found" and info.value.status == 404


def test_context_too_long_is_a_bad_request(make_client, llm_server):
    llm_server.add(error(400, "This model's maximum context length is 8192 tokens.", code="context_length_exceeded"))
    with pytest.raises(LLMError) as info:
        make_client().complete(MESSAGES, [])
    assert info.value.kind == "bad_request" and "maximum context length" in info.value.message


@pytest.mark.parametrize(
    "reply",
    [
        Reply(raw=b"<html>gateway</html>"),
        Reply(body={"id": "x", "choices": []}),
        Reply(body={"choices": [{"message": {"role": "assistant", "content": {"not": "text"}}}]}),
        Reply(body={"choices": [{"message": {"tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}}]}),
    ],
    ids=["not-json", "no-choices", "content-not-text", "tool-call-without-name"],
)
def test_malformed_bodies_are_retried_then_reported(make_client, llm_server, reply):
    llm_server.add(reply, reply)
    client = make_client(max_retries=1)
    with pytest.raises(LLMError) as info:
        client.complete(MESSAGES, [])
    assert info.value.kind == "malformed_response"
    assert len(llm_server.requests) == 2


def test_malformed_reply_usage_is_still_billed(make_client, llm_server):
    llm_server.add(
        Reply(body={"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 5}}),
        completion("ok", usage=(10, 1)),
    )
    client = make_client(max_retries=1)
    client.complete(MESSAGES, [])
    assert client.totals.prompt_tokens == 60 and client.totals.completion_tokens == 6 and client.totals.calls == 2


def test_unknown_model_price_is_cost_unknown_not_zero(make_client, llm_server):
    llm_server.add(completion("x", model="mystery-model"))
    client = make_client()
    response = client.complete(MESSAGES, [])
    assert response.cost is None and client.totals.cost_unknown
    assert client.totals.as_dict()["cost_usd"] is None
    assert cost_of("gpt-4o-2024-08-06", 1_000_000, 0, {"gpt-4o": ("2.50", "10")}) == Decimal("2.5")


def test_transcript_records_requests_responses_and_retries(make_client, llm_server, tmp_path):
    path = tmp_path / "transcript.jsonl"
    llm_server.add(error(503, "busy"), completion("ok"))
    client = make_client(path)
    client.complete(MESSAGES, [])
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"] for r in records] == ["request", "error", "retry", "response"]
    assert records[0]["messages"] == MESSAGES
    assert records[3]["message"]["content"] == "ok" and records[3]["prompt_tokens"] == 100


def test_unreachable_endpoint_is_named_without_credentials(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = LLMConfig(
        api_key="sk-never-shown-0123456789",
        base_url=f"http://user:sk-in-url-secret@127.0.0.1:{port}/v1?token=abc",
        max_retries=0,
    )
    with pytest.raises(LLMError) as info:
        LLMClient(config).complete(MESSAGES, [])
    message = info.value.message
    assert info.value.kind == "connection"
    assert f"cannot reach http://127.0.0.1:{port}/v1" in message
    assert "sk-in-url-secret" not in message and "user" not in message and "token=abc" not in message
    assert config.endpoint == f"http://127.0.0.1:{port}/v1"
    assert LLMConfig().endpoint == "https://api.openai.com/v1"


def test_401_names_the_endpoint_that_refused_the_key(llm_server):
    client = LLMClient(LLMConfig(api_key="sk-wrong-key-0123456789", base_url=llm_server.base_url, model="test-model"))
    with pytest.raises(LLMError) as info:
        client.complete(MESSAGES, [])
    assert info.value.kind == "authentication" and not info.value.retryable
    assert f"{llm_server.base_url} refused the API key" in info.value.message
    assert "sk-wrong-key" not in info.value.message


def test_a_replay_spends_nothing_and_keeps_the_recorded_cost_apart(tmp_path):
    transcript = tmp_path / "recorded.jsonl"
    transcript.write_text(
        json.dumps({"type": "request", "fingerprint": None})
        + "\n"
        + json.dumps(
            {
                "type": "response",
                "model": "gpt-4o-mini",
                "message": {"role": "assistant", "content": "done"},
                "prompt_tokens": 1000,
                "completion_tokens": 1000,
            }
        )
        + "\n"
    )
    config = LLMConfig(provider="replay", replay_file=str(transcript), prices={"gpt-4o-mini": ("0.15", "0.60")})
    client = LLMClient(config)
    response = client.complete(MESSAGES, [])
    assert response.message["content"] == "done" and response.cost == Decimal(0)
    assert client.totals.cost == Decimal(0) and not client.totals.cost_unknown
    assert client.totals.recorded_cost == Decimal("0.00075")  # 1000 * $0.15/M + 1000 * $0.60/M
    assert client.totals.as_dict()["recorded_cost_usd"] == "0.00075"
    assert client.totals.prompt_tokens == 1000  # the conversation's size is still reported


def test_a_live_client_has_no_recorded_cost(make_client, llm_server):
    llm_server.add(completion("hello", usage=(1000, 500)))
    client = make_client()
    client.complete(MESSAGES, [])
    assert client.totals.cost == Decimal("0.002") and client.totals.recorded_cost is None


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (LLMConfig(), "OPENAI_API_KEY is not set"),
        (LLMConfig(api_key="sk-x"), None),
        (LLMConfig(base_url="http://localhost:11434/v1"), None),  # a local server may need no key
        (LLMConfig(provider="replay"), "AGENTRUNNER_LLM_REPLAY_FILE"),
        (LLMConfig(provider="replay", replay_file="/nonexistent/t.jsonl"), "does not exist"),
        (LLMConfig(provider="anthropic", api_key="x"), "unknown LLM provider"),
    ],
)
def test_config_problem_names_what_is_missing(config, problem):
    from agentrunner.llm.config import config_problem

    found = config_problem(config)
    assert (found is None) if problem is None else (problem in found and "\n" not in found)
