from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from common.errors import DomainError

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# What an operator may store on a task (never a key): the provider and, for replay, its transcript.
TASK_CONFIG_KEYS = {"provider", "replay_file"}


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

    @property
    def endpoint(self) -> str:
        """The base URL as it may be shown: without credentials, query or fragment."""
        return display_url(self.base_url or OPENAI_DEFAULT_BASE_URL)


def display_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def config_problem(config: LLMConfig) -> str | None:
    """What is missing for a first call to have a chance, in one line (None when nothing is).

    A key is required for OpenAI itself; with OPENAI_BASE_URL set it is optional, since local
    OpenAI-compatible servers (Ollama, vLLM, llama.cpp) often take none."""
    if config.provider == "replay":
        if not config.replay_file:
            return "the replay provider needs AGENTRUNNER_LLM_REPLAY_FILE (a recorded transcript)"
        if not Path(config.replay_file).is_file():
            return f"the replay transcript {config.replay_file} does not exist"
        return None
    if config.provider != "openai":
        return f"unknown LLM provider {config.provider!r} (AGENTRUNNER_LLM_PROVIDER: openai or replay)"
    if not config.api_key and not config.base_url:
        return (
            "OPENAI_API_KEY is not set (set it, or OPENAI_BASE_URL for a local OpenAI-compatible server, "
            "or use `manage.py demo` to try Agent Runner without a model)"
        )
    return None


def lacks_live_model(config: LLMConfig) -> bool:
    """The configuration names OpenAI but no key and no endpoint: no live model here, while a task
    that replays a recorded transcript (its own ``llm_config``) still runs."""
    return config.provider == "openai" and not config.api_key and not config.base_url


class LLMNotConfigured(DomainError):
    """A claimed task needs a model this host cannot call. The task was given back; a runner
    host that cannot run it must not claim it again (nor the next one like it)."""

    code = "llm_not_configured"


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
