"""How big an event may be: the bounds the registry stores events within, shared with the remote
runner, which applies them before it sends (what the server would cut anyway never travels).

Events carry what the model and the repository's commands chose (a tool call's path, the model
name a server answered with, an error text): every string is cut, so a run's events stay small.
Bounding is idempotent (``bounded(bounded(x)) == bounded(x)``): a value the runner bounded is
stored as it was sent. Free of Django."""

from __future__ import annotations

import json
import math
from typing import Any

EVENT_MESSAGE_MAX = 2000
EVENT_STRING_MAX = 1000
EVENT_ITEMS_MAX = 1000
EVENT_KEY_MAX = 100
EVENT_DEPTH_MAX = 5  # containers nested deeper become "…"
TRUNCATED_KEY = "_truncated"  # set in an event's data when it had to be cut below these bounds


def cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters, saying how many were cut."""
    if len(text) <= limit:
        return text
    suffix = f"… ({len(text) - limit} more characters)"
    keep = max(0, limit - len(suffix))
    return f"{text[:keep]}… ({len(text) - keep} more characters)"[:limit]


def bounded(value: Any, depth: int = 0, *, string_max: int = EVENT_STRING_MAX, items_max: int = EVENT_ITEMS_MAX) -> Any:
    """``value`` with every string cut to ``string_max``, every list and object to ``items_max``
    entries, keys to EVENT_KEY_MAX characters, and containers below EVENT_DEPTH_MAX levels
    replaced by "…"."""
    if isinstance(value, str):
        return cut(value, string_max)
    if depth > EVENT_DEPTH_MAX and isinstance(value, (dict, list, tuple)):
        return "…"
    if isinstance(value, dict):
        items = list(value.items())[:items_max]
        return {
            cut(str(k), EVENT_KEY_MAX): bounded(v, depth + 1, string_max=string_max, items_max=items_max)
            for k, v in items
        }
    if isinstance(value, (list, tuple)):
        return [bounded(v, depth + 1, string_max=string_max, items_max=items_max) for v in value[:items_max]]
    return value


def json_safe(value: Any) -> Any:
    """``value`` as JSON any database column takes: NUL characters and lone surrogates (in strings
    and keys, at any depth) become U+FFFD, and NaN or infinite numbers null. The server refuses
    each of them; a runner relays what a model wrote and must not lose an event to one."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                value = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {json_safe(str(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def encode(value: Any) -> bytes:
    """Compact UTF-8 JSON, as the runner's HTTP client sends it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str).encode()


# Tighter bounds tried in turn on an event that is still too large for one request.
_SHRINK_STEPS = ((200, 100), (50, 20), (20, 5))


def fit_event(event: dict[str, Any], max_bytes: int) -> bytes:
    """One event (``{"type", "message", "data"}``) bounded as the registry stores it and encoded;
    when that is still over ``max_bytes`` its data is cut tighter, then dropped, and its message
    cut, until it fits (``data["_truncated"]`` then says how large it was). Never refused for
    its size: the event's type and the start of its message always arrive."""
    event = {
        "type": event["type"],
        "message": cut(event.get("message") or "", EVENT_MESSAGE_MAX),
        "data": bounded(event.get("data") or {}),
    }
    body = encode(event)
    if len(body) <= max_bytes:
        return body
    original = len(body)
    marker = {TRUNCATED_KEY: f"event data cut to fit one request (was {original} bytes)"}
    for string_max, items_max in _SHRINK_STEPS:
        data = bounded(event["data"], string_max=string_max, items_max=items_max)
        body = encode({**event, "data": {**data, **marker} if isinstance(data, dict) else marker})
        if len(body) <= max_bytes:
            return body
    body = encode({**event, "data": marker})
    limit = EVENT_MESSAGE_MAX
    while len(body) > max_bytes and limit > 50:
        limit //= 2
        body = encode({**event, "message": cut(event["message"], limit), "data": marker})
    return body
