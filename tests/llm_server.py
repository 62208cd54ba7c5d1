"""A real OpenAI-compatible HTTP server on localhost, scripted per test.

Tests point the real ``openai`` client at ``server.base_url``. Each POST to
``/v1/chat/completions`` takes the next scripted step (or asks ``responder`` when the script is
empty): a completion body, a ``Reply`` with any status, headers, delay or raw bytes, or a callable
that looks at the request and returns either.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ids = itertools.count(1)


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw: bytes | None = None


def completion(content: str | None = None, *calls: tuple[str, Any], usage=(100, 20), model: str = "test-model") -> dict:
    """A chat completion; each call is (tool name, arguments dict or raw string)."""
    tool_calls = [
        {
            "id": f"call_{next(_ids)}",
            "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)},
        }
        for name, args in calls
    ]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": f"chatcmpl-{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool_calls else "stop"}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
    }


def tool(name: str, **args) -> dict:
    return completion(None, (name, args))


def error(status: int, message: str, *, headers: dict[str, str] | None = None, code: str | None = None) -> Reply:
    return Reply(
        status=status, body={"error": {"message": message, "type": "error", "code": code}}, headers=headers or {}
    )


class LLMServer:
    def __init__(self, *, api_key: str | None = None, models: set[str] | None = None, delay: float = 0.0):
        self.api_key = api_key
        self.models = models
        self.delay = delay
        self.script: deque = deque()
        self.responder: Callable[[dict], Any] | None = None
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                reply = server._next(request, {k.lower(): v for k, v in self.headers.items()})
                if reply.delay:
                    time.sleep(reply.delay)
                payload = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> LLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, *steps) -> None:
        with self._lock:
            self.script.extend(steps)

    def _next(self, request: dict, headers: dict) -> Reply:
        with self._lock:
            self.requests.append(request)
            self.headers.append(headers)
            step = self.script.popleft() if self.script else None
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "Incorrect API key provided.", code="invalid_api_key")
        if self.models is not None and request.get("model") not in self.models:
            return error(404, f"The model `{request.get('model')}` does not exist.", code="model_not_found")
        if step is None:
            if self.responder is None:
                return error(500, "the test script has no more steps")
            step = self.responder
        if callable(step):
            step = step(request)
        reply = step if isinstance(step, Reply) else Reply(body=step)
        if self.delay and not reply.delay:
            reply.delay = self.delay
        return reply
