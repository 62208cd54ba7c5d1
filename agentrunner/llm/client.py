"""The LLM seam: Chat Completions with tool calling through the openai SDK (any
OpenAI-compatible server), or a replay of a recorded transcript.

One call = ``LLMClient.complete``: retries what can be retried with exponential backoff and
jitter that honours Retry-After, never waits longer in total than ``max_retry_wait``, reports
every retry, records request, response, usage and timing to the transcript, and keeps the billed
totals (retries and malformed replies included) that the agent's budget checks read.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from agentrunner.llm.config import LLMConfig
from agentrunner.llm.errors import LLMError, redact
from agentrunner.llm.pricing import cost_of


@dataclass
class LLMResponse:
    message: dict[str, Any]
    model: str
    prompt_tokens: int
    completion_tokens: int
    duration: float
    cost: Decimal | None
    finish_reason: str | None = None

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return self.message.get("tool_calls") or []


@dataclass
class Totals:
    calls: int = 0
    failed_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    cost_unknown: bool = False
    duration: float = 0.0
    retry_wait: float = 0.0
    # A replay spends nothing: what the recorded calls cost is kept apart (None for a live model).
    recorded_cost: Decimal | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "failed_calls": self.failed_calls,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": None if self.cost_unknown else str(self.cost),
            "cost_unknown": self.cost_unknown,
            "duration": round(self.duration, 4),
            "retry_wait": round(self.retry_wait, 4),
            "recorded_cost_usd": None if self.recorded_cost is None else str(self.recorded_cost),
        }


class Transcript:
    """JSON lines: every request (new messages only), response, retry, error and tool call."""

    def __init__(self, path: Path | None = None, *, secret: str | None = None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._secret = secret
        self._lock = threading.Lock()
        self._fh = open(path, "a", encoding="utf-8") if path else None

    def record(self, type: str, **data: Any) -> None:
        entry = {"type": type, "time": round(time.time(), 3), **data}
        line = json.dumps(entry, default=str, ensure_ascii=False)
        if self._secret and self._secret in line:
            line = line.replace(self._secret, "[redacted]")
            entry = json.loads(line)
        with self._lock:
            self.records.append(entry)
            if self._fh:
                self._fh.write(line + "\n")
                self._fh.flush()

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None


class Provider(Protocol):
    def create(
        self,
        *,
        model: str,
        messages: list[dict],
        tools: list[dict],
        max_tokens: int | None,
        temperature: float | None,
        timeout: float,
    ) -> tuple[dict, dict]:
        """Return (completion body, response headers) or raise LLMError."""


def fingerprint(messages: list[dict]) -> list[str]:
    """What must match for a replay: each message's role and tool ids, and the user's words.
    Tool results are left out: test timings and the like differ from run to run."""
    shape = []
    for message in messages:
        role = message.get("role", "")
        if role in ("user", "system"):
            shape.append(f"{role}:{hashlib.sha256(str(message.get('content')).encode()).hexdigest()[:16]}")
        elif role == "tool":
            shape.append(f"tool:{message.get('tool_call_id')}")
        else:
            calls = ",".join(f"{c['id']}:{c['function']['name']}" for c in message.get("tool_calls") or [])
            shape.append(f"assistant:{calls}")
    return shape


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _openai_client(config: LLMConfig):
    """One SDK client per (key, URL, timeout), shared by threads: building one loads TLS
    certificates and a connection pool, which is too slow to repeat for every task."""
    import openai

    key = (config.api_key, config.base_url, config.request_timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = openai.OpenAI(
                api_key=config.api_key or "not-set",
                base_url=config.base_url or None,
                timeout=config.request_timeout,
                max_retries=0,  # retries are ours: bounded, reported, Retry-After aware
            )
        return client


class OpenAIProvider:
    def __init__(self, config: LLMConfig):
        import openai

        self._openai = openai
        self._client = _openai_client(config)
        self._secret = config.api_key
        self._endpoint = config.endpoint

    def create(self, *, model, messages, tools, max_tokens, temperature, timeout):
        openai = self._openai
        kwargs: dict[str, Any] = {"model": model, "messages": messages, "timeout": timeout}
        if tools:
            kwargs["tools"] = tools
        if max_tokens:
            kwargs["max_tokens"] = max_tokens
        if temperature is not None:
            kwargs["temperature"] = temperature
        try:
            raw = self._client.chat.completions.with_raw_response.create(**kwargs)
        except openai.APITimeoutError:
            raise LLMError("timeout", f"no answer from {self._endpoint} within {timeout:g}s") from None
        except openai.APIConnectionError as exc:
            cause = redact(str(exc.__cause__ or exc), self._secret)
            raise LLMError("connection", f"cannot reach {self._endpoint}: {cause}") from None
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from None
        body_text = raw.http_response.text
        try:
            body = json.loads(body_text)
        except ValueError:
            raise LLMError("malformed_response", f"body is not JSON: {body_text[:200]!r}") from None
        return body, dict(raw.http_response.headers)

    def _status_error(self, exc) -> LLMError:
        status = exc.status_code
        message = redact(_error_message(exc), self._secret)
        if status in (401, 403):
            return LLMError("authentication", f"{self._endpoint} refused the API key: {message}", status=status)
        if status == 404:
            return LLMError("model_not_found", f"{self._endpoint}: {message}", status=status)
        if status == 429:
            return LLMError("rate_limited", message, status=status, retry_after=_retry_after(exc.response.headers))
        if status >= 500:
            return LLMError("server_error", message, status=status, retry_after=_retry_after(exc.response.headers))
        return LLMError("bad_request", message, status=status)


def _error_message(exc) -> str:
    try:
        body = exc.response.json()
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:500]
        return str(error)[:500]
    except Exception:
        return f"HTTP {exc.status_code}"


def _retry_after(headers) -> float | None:
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class ReplayProvider:
    """Answers with the assistant messages of a recorded transcript, in order, offline.

    Fails clearly (``replay_diverged``) when the conversation's shape differs from the recording.
    """

    def __init__(self, path: str | Path):
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise LLMError("replay_exhausted", f"cannot read replay file {path}: {exc.strerror}") from None
        records = [json.loads(line) for line in lines if line.strip()]
        self._requests = [r for r in records if r["type"] == "request"]
        self._responses = [r for r in records if r["type"] == "response"]
        self._index = 0
        self._lock = threading.Lock()

    def create(self, *, model, messages, tools, max_tokens, temperature, timeout):
        with self._lock:
            index = self._index
            self._index += 1
        if index >= len(self._responses):
            raise LLMError(
                "replay_exhausted", f"the recording has {len(self._responses)} answers; call {index + 1} asked for more"
            )
        expected = self._requests[index].get("fingerprint") if index < len(self._requests) else None
        actual = fingerprint(messages)
        if expected is not None and expected != actual:
            where = next(
                (i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
                min(len(expected), len(actual)),
            )
            raise LLMError(
                "replay_diverged",
                f"call {index + 1}: message {where} differs from the recording "
                f"(recorded {expected[where] if where < len(expected) else 'nothing'}, "
                f"got {actual[where] if where < len(actual) else 'nothing'})",
            )
        recorded = self._responses[index]
        body = {
            "model": recorded.get("model", model),
            "choices": [
                {"index": 0, "message": recorded["message"], "finish_reason": recorded.get("finish_reason", "stop")}
            ],
            "usage": {
                "prompt_tokens": recorded.get("prompt_tokens", 0),
                "completion_tokens": recorded.get("completion_tokens", 0),
            },
        }
        return body, {}


def make_provider(config: LLMConfig) -> Provider:
    if config.provider == "replay":
        if not config.replay_file:
            raise LLMError("replay_exhausted", "AGENTRUNNER_LLM_REPLAY_FILE is not set")
        return ReplayProvider(config.replay_file)
    if config.provider == "openai":
        return OpenAIProvider(config)
    raise LLMError("bad_request", f"unknown LLM provider {config.provider!r} (openai or replay)")


def _parse_completion(body: Any) -> tuple[dict, str | None, int, int, str]:
    if not isinstance(body, dict):
        raise LLMError("malformed_response", "the body is not a JSON object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise LLMError("malformed_response", "the completion has no choices")
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message")
    if not isinstance(message, dict):
        raise LLMError("malformed_response", "the first choice has no message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise LLMError("malformed_response", "message content is not text")
    clean: dict[str, Any] = {"role": "assistant", "content": content}
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise LLMError("malformed_response", "tool_calls is not a list")
    clean_calls = []
    for n, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise LLMError("malformed_response", f"tool call {n} has no function name")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = "{}"
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        clean_calls.append(
            {
                "id": str(call.get("id") or f"call_{n}"),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    if clean_calls:
        clean["tool_calls"] = clean_calls
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return (
        clean,
        choice.get("finish_reason"),
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        str(body.get("model") or ""),
    )


@dataclass
class LLMClient:
    config: LLMConfig
    transcript: Transcript = field(default_factory=Transcript)
    sleep: Callable[[float], None] = time.sleep
    provider: Provider | None = None
    totals: Totals = field(default_factory=Totals)

    def __post_init__(self) -> None:
        if self.provider is None:
            self.provider = make_provider(self.config)
        self._recorded_messages = 0
        self._replay = self.config.provider == "replay"
        if self._replay:
            self.totals.recorded_cost = Decimal(0)

    def complete(
        self,
        messages: list[dict],
        tools: list[dict],
        *,
        model: str | None = None,
        on_retry: Callable[[LLMError, int, float], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> LLMResponse:
        model = model or self.config.model
        self.transcript.record(
            "request",
            model=model,
            messages=messages[self._recorded_messages :],
            message_count=len(messages),
            fingerprint=fingerprint(messages),
        )
        self._recorded_messages = len(messages)
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._attempt(model, messages, tools)
            except LLMError as error:
                self.totals.failed_calls += 1
                self.transcript.record(
                    "error", kind=error.kind, message=error.message, status=error.status, attempt=attempt
                )
                if not error.retryable or attempt > self.config.max_retries:
                    raise
                wait = self._backoff(attempt, error.retry_after)
                if waited + wait > self.config.max_retry_wait:
                    raise LLMError(
                        error.kind,
                        f"{error.message} (gave up: waiting {wait:.1f}s more would exceed the "
                        f"{self.config.max_retry_wait:g}s retry budget)",
                        status=error.status,
                    ) from None
                waited += wait
                self.totals.retries += 1
                self.totals.retry_wait += wait
                self.transcript.record("retry", kind=error.kind, attempt=attempt, wait=round(wait, 3))
                if on_retry:
                    on_retry(error, attempt, wait)
                self._interruptible_sleep(wait, should_cancel)
                if should_cancel and should_cancel():
                    raise
                continue
            self.transcript.record(
                "response",
                model=response.model,
                message=response.message,
                finish_reason=response.finish_reason,
                prompt_tokens=response.prompt_tokens,
                completion_tokens=response.completion_tokens,
                duration=round(response.duration, 4),
                cost_usd=None if response.cost is None else str(response.cost),
                attempts=attempt,
            )
            return response

    def _attempt(self, model: str, messages: list[dict], tools: list[dict]) -> LLMResponse:
        started = time.monotonic()
        try:
            body, _headers = self.provider.create(
                model=model,
                messages=messages,
                tools=tools,
                max_tokens=self.config.max_output_tokens,
                temperature=self.config.temperature,
                timeout=self.config.request_timeout,
            )
        finally:
            elapsed = time.monotonic() - started
            self.totals.duration += elapsed
        self._bill_usage(body, model)
        message, finish_reason, prompt_tokens, completion_tokens, served_model = _parse_completion(body)
        served = served_model or model
        cost = Decimal(0) if self._replay else cost_of(served, prompt_tokens, completion_tokens, self.config.prices)
        return LLMResponse(message, served, prompt_tokens, completion_tokens, elapsed, cost, finish_reason)

    def _bill_usage(self, body: Any, model: str) -> None:
        """Count what the server billed, even when the reply turns out malformed."""
        self.totals.calls += 1
        usage = body.get("usage") if isinstance(body, dict) and isinstance(body.get("usage"), dict) else {}
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        self.totals.prompt_tokens += prompt
        self.totals.completion_tokens += completion
        served = str(body.get("model") or model) if isinstance(body, dict) else model
        cost = cost_of(served, prompt, completion, self.config.prices)
        if self._replay:
            # Nothing was billed; the recording's price is reported as such, never as spent.
            if cost is not None and self.totals.recorded_cost is not None:
                self.totals.recorded_cost += cost
        elif cost is None:
            self.totals.cost_unknown = True
        else:
            self.totals.cost += cost

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after  # the server knows best; the retry budget decides whether to wait
        ceiling = min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # "equal jitter": spread, but never zero

    def _interruptible_sleep(self, seconds: float, should_cancel: Callable[[], bool] | None) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if should_cancel and should_cancel():
                return
            self.sleep(min(left, 0.5))
