"""Cost of a call from a price table: USD per million input and output tokens, per model."""

from __future__ import annotations

from decimal import Decimal

# Published list prices (USD per 1M tokens: input, output); override or extend with
# AGENTRUNNER_LLM_PRICES. A model not in the table has an unknown cost, never 0.
DEFAULT_PRICES: dict[str, tuple[str, str]] = {
    "gpt-4o": ("2.50", "10.00"),
    "gpt-4o-mini": ("0.15", "0.60"),
    "gpt-4.1": ("2.00", "8.00"),
    "gpt-4.1-mini": ("0.40", "1.60"),
    "gpt-4.1-nano": ("0.10", "0.40"),
}

MILLION = Decimal(1_000_000)


def cost_of(model: str, prompt_tokens: int, completion_tokens: int, prices: dict) -> Decimal | None:
    entry = prices.get(model)
    if entry is None:
        # A dated snapshot ("gpt-4o-2024-08-06") is priced like its family when not listed.
        family = max((name for name in prices if model.startswith(name + "-")), key=len, default=None)
        entry = prices.get(family) if family else None
    if entry is None:
        return None
    price_in, price_out = (Decimal(str(v)) for v in entry)
    return (price_in * prompt_tokens + price_out * completion_tokens) / MILLION
