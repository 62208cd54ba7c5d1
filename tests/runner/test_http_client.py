"""The runner's HTTP client against a tiny real HTTP server that answers as scripted: retries,
backoff, Retry-After, the total bound, idempotency keys, the outbox's order. The server stands in
for the network (a busy or absent API), not for any service of ours; the services themselves are
exercised over HTTP by the pipeline tests in both modes."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agentrunner.runner.http import ApiClient, ApiConfig, ApiError, Outbox, TokenRejected, api_root
from common.outcomes import LeaseLost, NoSlotAvailable, ServiceUnavailable


class Scripted:
    """An HTTP server answering each request with the next scripted reply (the last one repeats).

    A reply is (status, headers, body) or ("sleep", seconds, reply)."""

    def __init__(self, replies, port: int = 0):
        self.replies = list(replies)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                if self.headers.get("Transfer-Encoding") == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = self.rfile.read(length)
                with outer.lock:
                    outer.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "at": time.monotonic()}
                    )
                    reply = outer.replies.pop(0) if len(outer.replies) > 1 else outer.replies[0]
                if reply[0] == "sleep":
                    time.sleep(reply[1])
                    reply = reply[2]
                status, headers, payload = reply
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if payload is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/runner/v1/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(*replies):
        server = Scripted(replies)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def client(url: str, **overrides) -> ApiClient:
    config = ApiConfig(
        registry_url=url,
        pool_url=url,
        artifacts_url=url,
        token="art_r_test",
        connect_timeout=1.0,
        read_timeout=2.0,
        retry_seconds=5.0,
        backoff_base=0.05,
        backoff_max=0.2,
    )
    return ApiClient(ApiConfig(**{**config.__dict__, **overrides}))


OK = (200, {}, {"ok": True})


def unavailable(code: str = "unavailable") -> tuple:
    return (503, {}, {"detail": "busy", "code": code, "errors": {}})


def test_retries_503_and_502_then_succeeds_with_one_idempotency_key(scripted):
    server = scripted(unavailable(), (502, {}, None), (504, {}, None), OK)
    api = client(server.url)
    response = api.call("POST", server.url + "claim/", json_body={"runner_id": "r"})
    assert response.json() == {"ok": True}
    assert len(server.requests) == 4
    keys = {r["headers"]["Idempotency-Key"] for r in server.requests}
    assert len(keys) == 1, "the one logical call keeps its key across retries"
    assert all(r["headers"]["Authorization"] == "Bearer art_r_test" for r in server.requests)
    assert api.retries == 3


def test_each_logical_call_gets_its_own_key_and_heartbeats_none(scripted):
    server = scripted(OK)
    api = client(server.url)
    api.call("POST", server.url + "a/", json_body={})
    api.call("POST", server.url + "a/", json_body={})
    api.call("POST", server.url + "hb/", json_body={}, idempotency_key=None, lease_token="lease-1")
    first, second, heartbeat = server.requests
    assert first["headers"]["Idempotency-Key"] != second["headers"]["Idempotency-Key"]
    assert "Idempotency-Key" not in heartbeat["headers"]
    assert heartbeat["headers"]["X-Lease-Token"] == "lease-1"


def test_429_waits_as_long_as_retry_after_says(scripted):
    server = scripted((429, {"Retry-After": "1"}, {"detail": "slow down", "code": "throttled"}), OK)
    api = client(server.url)
    api.call("POST", server.url + "events/", json_body={})
    first, second = server.requests
    assert second["at"] - first["at"] >= 0.95, "Retry-After is honoured, not the (shorter) backoff"


def test_backoff_grows_with_full_jitter_capped(scripted):
    server = scripted(unavailable())
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    api = ApiClient(client(server.url, backoff_base=0.05, backoff_max=0.4).config, sleep=sleep)
    with pytest.raises(ServiceUnavailable):
        api.call("POST", server.url + "x/", json_body={}, bound=1.5)
    assert len(waits) >= 3
    for n, wait in enumerate(waits, start=1):
        assert 0 <= wait <= min(0.4, 0.05 * 2 ** (n - 1)) + 1e-9, "exponential, capped, never above the ceiling"
    assert len(set(waits)) == len(waits), "full jitter: random waits, not a fixed schedule"


def test_the_total_bound_is_kept_and_says_what_failed(scripted):
    server = scripted(unavailable())
    api = client(server.url, retry_seconds=1.0, backoff_base=0.05, backoff_max=0.2)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        api.call("POST", server.url + "claim/", json_body={})
    elapsed = time.monotonic() - started
    assert elapsed <= 1.0 + 0.5, f"bounded in total time ({elapsed:.2f} s)"
    assert "503" in caught.value.message and "claim/" in caught.value.message
    assert len(server.requests) >= 3


def test_a_retry_after_beyond_the_bound_gives_up_at_once(scripted):
    server = scripted((429, {"Retry-After": "60"}, {"detail": "later", "code": "throttled"}))
    api = client(server.url, retry_seconds=2.0)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        api.call("POST", server.url + "claim/", json_body={})
    assert time.monotonic() - started < 1.0
    assert len(server.requests) == 1


def test_connection_refused_is_retried_until_the_bound():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api/runner/v1/"
    api = client(url, retry_seconds=0.8)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        api.call("POST", url + "claim/", json_body={})
    assert time.monotonic() - started <= 1.5
    assert api.calls >= 2
    assert "ConnectError" in caught.value.message


def test_a_server_that_comes_back_is_reached():
    """Nothing listens at first; the server starts on that port while the client backs off."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api/runner/v1/"
    api = client(url, retry_seconds=10.0, backoff_base=0.1, backoff_max=0.3)
    started: list[Scripted] = []
    timer = threading.Timer(0.7, lambda: started.append(Scripted([OK], port=port)))
    timer.start()
    try:
        response = api.call("POST", url + "claim/", json_body={})
        assert response.status_code == 200
        assert api.retries >= 1
        assert len(started[0].requests) == 1
    finally:
        timer.join()
        for server in started:
            server.stop()


def test_a_read_timeout_is_retried(scripted):
    server = scripted(("sleep", 1.5, OK), OK)
    api = client(server.url, read_timeout=0.5, retry_seconds=5.0)
    response = api.call("POST", server.url + "events/", json_body={})
    assert response.status_code == 200
    assert len(server.requests) == 2
    assert server.requests[0]["headers"]["Idempotency-Key"] == server.requests[1]["headers"]["Idempotency-Key"]


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ((409, {}, {"detail": "attempt 3 is no longer running", "code": "lease_lost"}), LeaseLost),
        ((409, {}, {"detail": "stale", "code": "stale_lease"}), LeaseLost),
        ((401, {}, {"detail": "revoked", "code": "token_revoked"}), TokenRejected),
        ((503, {"Retry-After": "5"}, {"detail": "no free slot", "code": "no_slot"}), NoSlotAvailable),
        ((400, {}, {"detail": "bad", "code": "invalid", "errors": {"wait": ["too long"]}}), ApiError),
    ],
)
def test_refusals_are_not_retried_and_keep_their_meaning(scripted, reply, error):
    server = scripted(reply)
    api = client(server.url)
    with pytest.raises(error) as caught:
        api.call("POST", server.url + "attempts/3/heartbeat/", json_body={})
    assert len(server.requests) == 1
    if error is ApiError:
        assert caught.value.status == 400 and caught.value.errors == {"wait": ["too long"]}


def test_a_streamed_body_is_sent_whole_again_on_retry(scripted, tmp_path):
    server = scripted(unavailable(), (201, {}, {"id": str(uuid.uuid4())}))
    api = client(server.url)
    data = bytes(range(256)) * 9000  # 2.3 MB, several chunks
    path = tmp_path / "blob"
    path.write_bytes(data)

    def chunks():
        with open(path, "rb") as fh:
            while chunk := fh.read(1024 * 1024):
                yield chunk

    api.call("POST", server.url + "attempts/1/artifacts/", content=chunks, headers={"X-Content-SHA256": "x"})
    assert [r["body"] for r in server.requests] == [data, data]


def wait_for_backoff(outbox: Outbox) -> None:
    """Until the outbox's sender has met the unavailable server and backs off (for a second)."""
    deadline = time.monotonic() + 5
    while outbox._retry_at == 0.0:
        assert time.monotonic() < deadline, "the outbox never tried to send"
        time.sleep(0.01)


def test_the_outbox_keeps_order_while_the_server_is_away_and_delivers_once_back(scripted):
    server = scripted(unavailable())
    api = client(server.url, retry_seconds=5.0)
    outbox = Outbox(api, server.url)
    started = time.monotonic()
    outbox.add_events(7, "lease", [{"type": "a", "message": "1", "data": {}}])
    outbox.add_events(7, "lease", [{"type": "b", "message": "2", "data": {}}])
    outbox.add_usage(7, "lease", {"prompt_tokens": 3, "completion_tokens": 4, "cost_usd": None})
    outbox.add_events(7, "lease", [{"type": "c", "message": "3", "data": {}}])
    assert time.monotonic() - started < 1.0, "the run is not held up while the server is away"
    assert len(outbox) >= 3
    wait_for_backoff(outbox)
    tried = len(server.requests)
    server.replies = [OK]  # the server is back
    assert outbox.flush(block=True, bound=5.0)
    delivered = server.requests[tried:]
    paths = [r["path"].rsplit("/", 2)[-2] for r in delivered]
    bodies = [json.loads(r["body"]) for r in delivered]
    messages = [e["message"] for b in bodies if "events" in b for e in b["events"]]
    assert messages == ["1", "2", "3"]
    assert paths.index("usage") > 0 and paths[-1] == "events", "usage between the events it came between"
    # A batch that was tried once keeps its key (and its content) when tried again.
    first_try = [r for r in server.requests[:tried] if r["path"].endswith("events/")]
    if first_try:
        assert first_try[0]["headers"]["Idempotency-Key"] == delivered[0]["headers"]["Idempotency-Key"]
        assert json.loads(first_try[0]["body"]) == bodies[0]


def test_the_outbox_drops_an_attempt_the_server_fenced(scripted):
    server = scripted(unavailable())
    api = client(server.url, retry_seconds=1.0)
    outbox = Outbox(api, server.url)
    outbox.add_events(9, "old", [{"type": "a", "message": "", "data": {}}])
    outbox.add_usage(9, "old", {"prompt_tokens": 1, "completion_tokens": 1, "cost_usd": "0.01"})
    assert len(outbox) == 2
    wait_for_backoff(outbox)
    server.replies = [(409, {}, {"detail": "attempt 9 is no longer running", "code": "lease_lost"})]
    with pytest.raises(LeaseLost):
        outbox.flush(block=True, bound=1.0)
    assert len(outbox) == 0, "what the fenced attempt left is dropped: the server refuses it for good"


def test_api_root():
    assert api_root("http://h:8000") == "http://h:8000/api/runner/v1/"
    assert api_root("http://h:8000/") == "http://h:8000/api/runner/v1/"
    assert api_root("http://h/api/runner/v1/") == "http://h/api/runner/v1/"
