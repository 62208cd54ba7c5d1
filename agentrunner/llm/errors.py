"""The one error set of LLM calls. Each kind says whether a retry can help."""

from __future__ import annotations

import re

from common.outcomes import LLM_RETRYABLE_KINDS as RETRYABLE

KINDS = {
    "authentication": "the API key was refused (401/403)",
    "model_not_found": "the model does not exist on this server (404)",
    "bad_request": "the server refused the request (400), e.g. the context is too long",
    "rate_limited": "rate limited (429)",
    "timeout": "no answer within the request timeout",
    "connection": "the server could not be reached",
    "server_error": "the server failed (5xx)",
    "malformed_response": "the answer was not a valid chat completion",
    "replay_diverged": "the conversation left the recorded transcript",
    "replay_exhausted": "the recorded transcript has no more answers",
}

_KEY_PATTERN = re.compile(r"(sk-[A-Za-z0-9_\-]{4,}|Bearer\s+\S+)")


def redact(text: str, secret: str | None = None) -> str:
    """Remove an API key (ours, or anything shaped like one) from a message."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return _KEY_PATTERN.sub("[redacted]", text)


class LLMError(Exception):
    def __init__(self, kind: str, message: str, *, status: int | None = None, retry_after: float | None = None):
        assert kind in KINDS, kind
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE
