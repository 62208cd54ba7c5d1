from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LLMConfig:
    """Everything a client needs; built from settings by ``from_settings`` (no Django below here)."""

    provider: str = "openai"  # openai | replay
    api_key: str = field(default="", repr=False)
    base_url: str | None = None
    model: str = "gpt-4o-mini"
    request_timeout: float = 120.0
    max_retries: int = 4
    max_retry_wait: float = 120.0  # total seconds a call may spend waiting between retries
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    max_output_tokens: int | None = 4096
    temperature: float | None = 0.0
    prices: dict = field(default_factory=dict)
    replay_file: str | None = None


def from_settings(**overrides) -> LLMConfig:
    from django.conf import settings

    from agentrunner.llm.pricing import DEFAULT_PRICES

    values = dict(
        provider=settings.AGENTRUNNER_LLM_PROVIDER,
        api_key=settings.OPENAI_API_KEY,
        base_url=settings.OPENAI_BASE_URL or None,
        model=settings.AGENTRUNNER_LLM_MODEL,
        request_timeout=settings.AGENTRUNNER_LLM_TIMEOUT,
        max_retries=settings.AGENTRUNNER_LLM_MAX_RETRIES,
        max_retry_wait=settings.AGENTRUNNER_LLM_MAX_RETRY_WAIT,
        backoff_base=settings.AGENTRUNNER_LLM_BACKOFF_BASE,
        max_output_tokens=settings.AGENTRUNNER_LLM_MAX_OUTPUT_TOKENS,
        temperature=settings.AGENTRUNNER_LLM_TEMPERATURE,
        prices={**DEFAULT_PRICES, **settings.AGENTRUNNER_LLM_PRICES},
        replay_file=settings.AGENTRUNNER_LLM_REPLAY_FILE or None,
    )
    values.update({k: v for k, v in overrides.items() if v not in (None, "")})
    return LLMConfig(**values)
