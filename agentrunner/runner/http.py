"""The runner's ports over HTTP: what a runner host uses when it holds an API URL and a runner token.

One client (``ApiClient``) makes every call: connect and read timeouts, retries with exponential
backoff and full jitter on connection errors, timeouts, 429 (its Retry-After honoured) and
502/503/504, all bounded in total time per call. Every POST but heartbeat and renew carries an
``Idempotency-Key`` made once per logical call and sent again on each retry, so a retry after a lost
answer changes nothing twice. Attempt calls carry the attempt's ``X-Lease-Token``; the server
answers 409 ``lease_lost`` to a runner that no longer holds the attempt (``LeaseLost`` here).

When the server cannot be reached the run goes on: events and usage wait in an ordered outbox
(``Outbox``) and are delivered in order once it answers again (the heartbeat thread tries now and
then; ``flush`` before ``finish`` waits for it). ``finish`` is retried until it is delivered or the
server says the attempt is no longer ours (then the result is discarded).

The working copies live on this host: ``HttpPool`` leases a slot's row on the server, prepares the
copy here (``workcopy.slots``), and resets it here before it gives the row back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import secrets
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx

from common.errors import DomainError
from common.events import fit_event, json_safe
from common.outcomes import (
    GitError,
    LeaseLost,
    NoSlotAvailable,
    RefNotFound,
    ServiceUnavailable,
    SlotBroken,
    TokenRejected,
)
from common.procs import strip_credentials

log = logging.getLogger(__name__)

API_PREFIX = "/api/runner/v1/"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
CHUNK = 1024 * 1024
MICRO_USD = Decimal("0.000001")
RUNNER_VERSION = "1"  # what the server may check a runner host against


class ApiError(DomainError):
    """The server refused a call (a 4xx other than the ones with a meaning of their own). A
    ``DomainError``: the command line and the Celery task treat it like the in-process refusal."""

    def __init__(self, message: str, *, status: int, code: str = "", errors: dict | None = None):
        super().__init__(message, code=code or "api_error")
        self.status = status
        self.errors = errors or {}


@dataclass(frozen=True)
class ApiConfig:
    """Where the three services are and how patiently to call them (from settings, or given)."""

    registry_url: str
    pool_url: str
    artifacts_url: str
    token: str
    host: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retry_seconds: float = 60.0  # total bound of one call's retries
    finish_retry_seconds: float = 900.0  # flush and finish: until delivered, fenced, or this long
    heartbeat_retry_seconds: float = 10.0  # a heartbeat is tried again at its next tick anyway
    backoff_base: float = 0.25
    backoff_max: float = 15.0
    max_body_bytes: int = 1024 * 1024  # the server's JSON body cap as this host knows it (batches: half)

    @classmethod
    def from_settings(cls, server_url: str = "") -> ApiConfig | None:
        """None when this host is not configured as a remote runner (no URL or no token)."""
        from django.conf import settings

        base = server_url or settings.AGENTRUNNER_API_URL
        urls = [settings.TASK_REGISTRY_URL or base, settings.REPO_POOL_URL or base, settings.ARTIFACT_STORE_URL or base]
        if not all(urls):
            return None
        if not settings.AGENTRUNNER_RUNNER_TOKEN:
            return None
        return cls(
            registry_url=api_root(urls[0]),
            pool_url=api_root(urls[1]),
            artifacts_url=api_root(urls[2]),
            token=settings.AGENTRUNNER_RUNNER_TOKEN,
            host=settings.AGENTRUNNER_HOST,
            connect_timeout=settings.AGENTRUNNER_API_CONNECT_TIMEOUT,
            read_timeout=settings.AGENTRUNNER_API_READ_TIMEOUT,
            retry_seconds=settings.AGENTRUNNER_API_RETRY_SECONDS,
            finish_retry_seconds=settings.AGENTRUNNER_API_FINISH_RETRY_SECONDS,
            heartbeat_retry_seconds=settings.AGENTRUNNER_API_HEARTBEAT_RETRY_SECONDS,
            backoff_base=settings.AGENTRUNNER_API_BACKOFF_BASE,
            backoff_max=settings.AGENTRUNNER_API_BACKOFF_MAX,
            max_body_bytes=settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 1024 * 1024,
        )


def api_root(url: str) -> str:
    """The runner API's root under a server's base URL (a URL that already names it is kept)."""
    url = url.rstrip("/")
    if url.endswith(API_PREFIX.rstrip("/")):
        return url + "/"
    return url + API_PREFIX


def new_key() -> str:
    return f"ar-{secrets.token_urlsafe(24)}"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_of(response: httpx.Response) -> tuple[str, str, dict]:
    """(detail, code, errors) from our error shape, or the status line when the body is not ours."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        errors = body.get("errors") if isinstance(body.get("errors"), dict) else {}
        return str(body.get("detail") or response.reason_phrase), str(body.get("code") or ""), errors
    return f"HTTP {response.status_code} {response.reason_phrase}", "", {}


class ApiClient:
    """One httpx client for every call of a runner host (thread-safe: the heartbeat thread shares it)."""

    def __init__(self, config: ApiConfig, *, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self._sleep = sleep
        self._http = httpx.Client(
            timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
            headers={"Authorization": f"Bearer {config.token}", "User-Agent": "agentrunner-runner"},
            follow_redirects=False,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
        self.calls = 0  # requests sent, retries included
        self.retries = 0

    def close(self) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        content: Callable[[], Iterator[bytes] | bytes] | None = None,
        headers: dict[str, str] | None = None,
        lease_token: str = "",
        idempotency_key: str | None = "",
        bound: float | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        """Send one logical call, retried while the server is unreachable or busy, for at most
        ``bound`` seconds (default: the config's ``retry_seconds``; 0: one try). ``content`` makes
        the body anew for each try (a file is read again from its start).

        ``idempotency_key``: "" makes one for this call (the same on every retry); None sends none.
        Raises LeaseLost (409 lease_lost / stale_lease), TokenRejected (401), NoSlotAvailable
        (503 no_slot), ApiError (any other refusal) and ServiceUnavailable when the bound passed."""
        config = self.config
        headers = dict(headers or {})
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key or new_key()
        if lease_token:
            headers["X-Lease-Token"] = lease_token
        timeout = httpx.Timeout(read_timeout or config.read_timeout, connect=config.connect_timeout)
        started = time.monotonic()
        deadline = started + (config.retry_seconds if bound is None else bound)
        tries = 0
        while True:
            tries += 1
            self.calls += 1
            retry_after: float | None = None
            try:
                response = self._http.request(
                    method,
                    url,
                    json=json_body,
                    content=content() if content is not None else None,
                    headers=headers,
                    timeout=timeout,
                )
            except httpx.TransportError as exc:  # connect/read/write errors and timeouts
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code < 400:
                    return response
                detail, code, errors = _error_of(response)
                status = response.status_code
                if status == 409 and code in ("lease_lost", "stale_lease"):
                    raise LeaseLost(detail)
                if status == 401:
                    raise TokenRejected(f"the server refused the runner token: {detail}")
                if status == 503 and code in ("no_slot", "no_slot_available"):
                    raise NoSlotAvailable(detail)
                if status not in RETRY_STATUSES:
                    raise ApiError(f"{method} {_short(url)}: {detail}", status=status, code=code, errors=errors)
                retry_after = _retry_after(response)
                problem = f"HTTP {status} {detail}"
            wait = (
                retry_after
                if retry_after is not None
                else random.uniform(0, min(config.backoff_max, config.backoff_base * 2 ** (tries - 1)))
            )
            now = time.monotonic()
            if now + wait > deadline:
                raise ServiceUnavailable(
                    f"{method} {_short(url)}: {problem} (gave up after {tries} tries in {now - started:.1f} s)"
                )
            self.retries += 1
            log.info("%s %s: %s; try %d in %.2f s", method, _short(url), problem, tries + 1, wait)
            self._sleep(wait)


def _short(url: str) -> str:
    return url.split(API_PREFIX, 1)[-1] if API_PREFIX in url else url


# --- the outbox ------------------------------------------------------------------------------------
@dataclass
class _Pending:
    kind: str  # events | usage
    attempt_id: int
    lease_token: str
    body: Any = None  # usage: the JSON object
    events: list[bytes] = field(default_factory=list)  # events: each one encoded (common.events.fit_event)
    size: int = 0  # bytes of ``events`` and their commas
    key: str = ""  # made when first sent: from then on the body never changes

    def payload(self) -> bytes:
        return b'{"events":[' + b",".join(self.events) + b"]}"


class Outbox:
    """Events and usage in the order the run made them, each delivered once, in that order.

    ``add_*`` never wait for the network: a sender thread of the outbox delivers what waits (one
    try at a time, backing off while the server is unreachable) and ends when nothing is left.
    Consecutive events not sent yet travel in one batch: at most 500, and at most
    ``max_batch_bytes`` (half the JSON body cap, ``AGENTRUNNER_MAX_JSON_BODY``), so a batch never
    meets the server's 413. An event is bounded as the registry stores it, and one still larger
    than a batch may be is cut to fit (``common.events.fit_event``). Should the server refuse a
    batch all the same (413: its cap is smaller than this host believes; 400 naming the events:
    one of them is malformed), the batch is split in two and each half sent again, down to the one
    event at fault: that one is cut harder (413) or dropped (400), never its neighbours.
    ``flush(block=True)`` waits until everything is delivered."""

    MAX_BATCH = 500
    MIN_BATCH_BYTES = 16 * 1024  # what a 413 may teach the batch size down to

    def __init__(self, api: ApiClient, root: str, *, max_batch_bytes: int | None = None):
        self.api = api
        self.root = root
        self.max_batch_bytes = max_batch_bytes or max(self.MIN_BATCH_BYTES, api.config.max_body_bytes // 2)
        self._items: deque[_Pending] = deque()
        self._lock = threading.Lock()  # guards _items
        self._sending = threading.Lock()  # one sender at a time keeps the order
        self._retry_at = 0.0
        self._backoff = 0.0
        self._sender: threading.Thread | None = None  # set and cleared under _lock
        self._wake = threading.Event()
        self.delivered = 0
        self.dropped = 0  # events the server refused one by one (each logged)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def add_events(self, attempt_id: int, lease_token: str, events: list[dict]) -> None:
        # Encoded here, once: the body of a batch is then the same bytes on every retry.
        limit = self.max_batch_bytes - 64  # room for the batch's own brackets
        encoded = [fit_event(event, limit) for event in events]
        with self._lock:
            last = self._items[-1] if self._items else None
            for body in encoded:
                if (
                    last is not None
                    and last.kind == "events"
                    and not last.key
                    and last.attempt_id == attempt_id
                    and len(last.events) < self.MAX_BATCH
                    and last.size + 1 + len(body) <= self.max_batch_bytes - 16
                ):
                    last.events.append(body)
                    last.size += 1 + len(body)
                else:
                    last = _Pending("events", attempt_id, lease_token, events=[body], size=len(body))
                    self._items.append(last)
            self._kick()

    def add_usage(self, attempt_id: int, lease_token: str, usage: dict) -> None:
        with self._lock:
            self._items.append(_Pending("usage", attempt_id, lease_token, body=usage))
            self._kick()

    def _kick(self) -> None:
        """Called with ``_lock`` held, after adding: wake the sender, or start one."""
        if self._sender is not None:
            self._wake.set()
            return
        self._sender = threading.Thread(target=self._send_loop, daemon=True, name="runner-outbox")
        self._sender.start()

    def _send_loop(self) -> None:
        # The sender ends only under _lock with nothing left, and _kick runs under _lock after an
        # item is added: an item is never left without a sender.
        while True:
            self._wake.clear()
            try:
                self.flush(block=False)
            except Exception:  # never dies with items left: logged, tried again
                log.exception("delivering events and usage failed")
            with self._lock:
                if not self._items:
                    self._sender = None
                    return
            self._wake.wait(min(1.0, max(0.05, self._retry_at - time.monotonic())))

    def flush(self, *, block: bool, bound: float | None = None) -> bool:
        """Send what waits, in order. True when nothing is left.

        ``block=False``: one try each, only if the server answered lately, and never waiting for
        another thread's send. ``block=True``: each item retried for up to ``bound`` seconds;
        raises ServiceUnavailable when one still cannot be delivered, LeaseLost when the server
        says the attempt is no longer ours (what waits for that attempt is dropped: it would be
        refused too)."""
        if not block and time.monotonic() < self._retry_at:
            return False
        if not self._sending.acquire(blocking=block):
            return False
        try:
            while True:
                with self._lock:
                    if not self._items:
                        return True
                    item = self._items[0]
                    if not item.key:
                        item.key = new_key()
                try:
                    if item.kind == "events":
                        payload = item.payload()
                        sent: dict[str, Any] = {
                            "content": lambda payload=payload: payload,
                            "headers": {"Content-Type": "application/json"},
                        }
                    else:
                        sent = {"json_body": item.body}
                    self.api.call(
                        "POST",
                        f"{self.root}attempts/{item.attempt_id}/{item.kind}/",
                        lease_token=item.lease_token,
                        idempotency_key=item.key,
                        bound=bound if block else 0,
                        **sent,
                    )
                except ServiceUnavailable:
                    self._backoff = min(30.0, max(1.0, self._backoff * 2))
                    self._retry_at = time.monotonic() + self._backoff
                    if block:
                        raise
                    return False
                except LeaseLost:
                    self._drop_attempt(item.attempt_id)
                    if block:
                        raise
                    return False
                except ApiError as exc:  # refused for good: never blocks the rest
                    if item.kind == "events" and self._refused_events(item, exc):
                        continue  # split or cut: the parts go first, in order
                    if item.kind == "events":
                        self.dropped += len(item.events)
                    log.warning("%s of attempt %s refused and dropped: %s", item.kind, item.attempt_id, exc.message)
                self._backoff = 0.0
                self._retry_at = 0.0
                with self._lock:
                    if self._items and self._items[0] is item:
                        self._items.popleft()
                        self.delivered += 1
        finally:
            self._sending.release()

    def _refused_events(self, item: _Pending, exc: ApiError) -> bool:
        """A batch the server refused: put what may still be delivered in its place, at the head
        (True), or nothing more can be done with it (False: it is dropped). Nothing of a refused
        batch was stored, so its parts go under new idempotency keys."""
        too_large = exc.status == 413
        if not too_large and not (exc.status == 400 and "events" in exc.errors):
            return False
        if too_large:  # the server's cap is below what this host believed: learn it
            self.max_batch_bytes = max(self.MIN_BATCH_BYTES, min(self.max_batch_bytes, len(item.payload()) // 2))
        if len(item.events) > 1:
            middle = len(item.events) // 2
            parts = [item.events[:middle], item.events[middle:]]
        elif too_large:
            event = json.loads(item.events[0])
            smaller = fit_event(event, max(1024, min(self.max_batch_bytes, len(item.events[0]) // 2) - 64))
            if len(smaller) >= len(item.events[0]):
                return False  # as small as it gets
            parts = [[smaller]]
        else:
            return False
        replacement = [
            _Pending("events", item.attempt_id, item.lease_token, events=part, size=sum(len(e) + 1 for e in part))
            for part in parts
        ]
        with self._lock:
            if not self._items or self._items[0] is not item:
                return False
            self._items.popleft()
            self._items.extendleft(reversed(replacement))
        log.info("events of attempt %s refused (%s): sent again in %d part(s)", item.attempt_id, exc.status, len(parts))
        return True

    def _drop_attempt(self, attempt_id: int) -> None:
        with self._lock:
            dropped = [i for i in self._items if i.attempt_id == attempt_id]
            self._items = deque(i for i in self._items if i.attempt_id != attempt_id)
        if dropped:
            log.warning("attempt %s is no longer ours: %d undelivered item(s) dropped", attempt_id, len(dropped))


# --- the ports ---------------------------------------------------------------------------------
class _HttpPort:
    name = ""

    def __init__(self, api: ApiClient, root: str, timed=None):
        from agentrunner.runner.ports import Timed

        self.api = api
        self.root = root
        self.timed = timed or Timed()

    def _post(self, path: str, body: Any = None, **kwargs) -> httpx.Response:
        started = time.monotonic()
        try:
            return self.api.call("POST", self.root + path, json_body=body, **kwargs)
        finally:
            self.timed.add(self.name, started)


def _decimal(value) -> Decimal | None:
    return None if value in (None, "") else Decimal(str(value))


def claimed_task(data: dict):
    """A ClaimedTask from the claim endpoint's answer."""
    from agentrunner.runner.ports import ClaimedTask

    task, attempt = data["task"], data["attempt"]
    known = {f for f in ClaimedTask.__dataclass_fields__}
    values = {k: v for k, v in task.items() if k in known}
    values.update(
        id=uuid.UUID(str(task["id"])),
        max_cost_usd=_decimal(task.get("max_cost_usd")),
        attempt_id=int(attempt["id"]),
        attempt_number=int(attempt["number"]),
        lease_token=str(attempt["lease_token"]),
    )
    return ClaimedTask(**values)


class HttpRegistry(_HttpPort):
    name = "registry"
    events_block = False  # the outbox takes them at once

    def __init__(self, api: ApiClient, root: str, timed=None):
        super().__init__(api, root, timed)
        self.outbox = Outbox(api, root)

    def announce(self, *, name: str, capacity: dict[str, int], version: str) -> None:
        self._post("hosts/", {"name": name, "capacity": capacity, "version": version})

    def claim(self, *, runner_id, task_id=None, wait: float = 0, replay_only: bool = False):
        body: dict[str, Any] = {"runner_id": runner_id, "wait": wait}
        if task_id:
            body["task_id"] = str(task_id)
        if replay_only:
            body["replay_only"] = True
        # A long poll holds the answer up to ``wait`` seconds: the read timeout covers it.
        response = self._post("claim/", body, read_timeout=self.api.config.read_timeout + wait)
        if response.status_code == 204:
            return None
        return claimed_task(response.json())

    def events(self, *, task, events):
        started = time.monotonic()
        try:
            self.outbox.add_events(task.attempt_id, task.lease_token, [_event(e) for e in events])
        finally:
            self.timed.add(self.name, started)

    def heartbeat(self, *, task, slot_id=None, metrics=None):
        from agentrunner.runner.ports import Heartbeat

        body: dict[str, Any] = {}
        if slot_id is not None:
            body["slot_id"] = slot_id
        if metrics is not None:
            body["metrics"] = metrics
        response = self._post(
            f"attempts/{task.attempt_id}/heartbeat/",
            body,
            lease_token=task.lease_token,
            idempotency_key=None,
            bound=self.api.config.heartbeat_retry_seconds,
        )
        self.outbox.flush(block=False)  # the server answers: deliver what waited meanwhile
        return Heartbeat(cancel_requested=bool(response.json().get("cancel_requested")))

    def add_usage(self, *, task, prompt_tokens, completion_tokens, cost_usd):
        started = time.monotonic()
        try:
            self.outbox.add_usage(
                task.attempt_id,
                task.lease_token,
                {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    # The API keeps micro-dollars: more places would be refused.
                    "cost_usd": None if cost_usd is None else str(Decimal(cost_usd).quantize(MICRO_USD)),
                },
            )
        finally:
            self.timed.add(self.name, started)

    def link_artifact(self, *, task, artifact_id, role):
        self._post(
            f"attempts/{task.attempt_id}/artifact-links/",
            {"artifact_id": str(artifact_id), "role": role},
            lease_token=task.lease_token,
        )

    def flush(self) -> None:
        started = time.monotonic()
        try:
            self.outbox.flush(block=True, bound=self.api.config.finish_retry_seconds)
        finally:
            self.timed.add(self.name, started)

    def finish(self, *, task, status, failure_reason, message, retry, result, metrics):
        # What the run reported before its end goes first: the event log has no gap.
        self.flush()
        response = self._post(
            f"attempts/{task.attempt_id}/finish/",
            {
                "status": status,
                "failure_reason": failure_reason,
                "message": message,
                "retry": retry,
                "result": result,
                "metrics": metrics,
            },
            lease_token=task.lease_token,
            bound=self.api.config.finish_retry_seconds,
        )
        return response.json()["status"]


def _event(event: dict) -> dict:
    """An event as the runner API takes it. What a model wrote may hold what no JSON column takes
    (a NUL, a lone surrogate, NaN): replaced (``json_safe``), so the server never refuses it."""
    kind = event.get("type") or event.get("kind") or ""
    return {"type": kind, "message": json_safe(event.get("message", "")), "data": json_safe(event.get("data") or {})}


@dataclass
class _Held:
    """What this host knows of a slot it holds: enough to reset it when giving it back."""

    spec: Any
    path: Path
    commit: str


class HttpPool(_HttpPort):
    name = "pool"

    def __init__(self, api: ApiClient, root: str, timed=None, *, pool_root: Path | None = None):
        super().__init__(api, root, timed)
        self.pool_root = pool_root
        self._held: dict[int, _Held] = {}

    def _root(self) -> Path:
        if self.pool_root is not None:
            return self.pool_root
        from django.conf import settings

        return Path(settings.REPO_POOL_ROOT)

    def allocate(self, *, task, holder, lease_seconds, wait_seconds, ref):
        """Lease a row of this host's pool on the server, make the copy ready here, record it there."""
        from agentrunner.runner.ports import SlotLease
        from workcopy import slots
        from workcopy.layout import remote_slot_path

        wait_seconds = max(0.0, min(float(wait_seconds), 30.0))
        host = self.api.config.host
        response = self._post(
            "slots/allocate/",
            {
                "repository_id": task.repository_id,
                "holder": holder,
                "lease_seconds": lease_seconds,
                "wait_seconds": wait_seconds,
                "attempt_id": task.attempt_id,
                **({"host": host} if host else {}),
            },
            lease_token=task.lease_token,  # the slot is recorded on the attempt: fenced by it
            read_timeout=self.api.config.read_timeout + wait_seconds,
        )
        data = response.json()
        slot, spec = data["slot"], slots.spec_from_dict(data["repository"])
        slot_id, token = int(slot["id"]), uuid.UUID(str(slot["token"]))
        # Where the copy lives is this host's business: under its pool root, in a folder named after
        # the host (an in-process runner sharing the data folder keeps <repository>/<index>).
        path = remote_slot_path(host or "default", spec.name, int(slot["index"]))
        seen = slots.seen_from_dict({**slot, "path": path}, pool_root=self._root())
        if seen.commit and not seen.path.exists():
            # Not on this disk (a data folder wiped, or kept under the layout before the host's
            # folder): cloned again, rather than the slot reported broken.
            seen = dataclasses.replace(seen, commit="", needs_reset=False)
        started = time.monotonic()
        try:
            prepared = slots.prepare(spec, seen, ref, fetch_ttl=_fetch_ttl())
        except RefNotFound:
            # The copy is fine: the row goes back as it was (a copy never recorded is cloned again).
            self._give_back(slot_id, token, seen.commit)
            raise
        except (SlotBroken, GitError, OSError) as exc:
            self._give_back(slot_id, token, seen.commit, broken_reason=getattr(exc, "message", "") or str(exc))
            raise SlotBroken(getattr(exc, "message", "") or str(exc)) from None
        finally:
            self.timed.add("prepare", started)
        self._post(
            f"slots/{slot_id}/prepared/",
            {
                "token": str(token),
                "commit": prepared.commit,
                "setup_hash": prepared.setup_hash,
                "fetched": prepared.fetched,
                "base_commit": prepared.base_commit,
            },
        )
        # A reset after the lease returns to the base (the default branch's commit), as in-process.
        base = prepared.base_commit or seen.base_commit or prepared.commit
        self._held[slot_id] = _Held(spec, seen.path, base)
        return SlotLease(
            slot_id=slot_id,
            path=seen.path,
            token=token,
            expires_at=datetime.fromisoformat(str(slot["expires_at"]).replace("Z", "+00:00")),
            commit=prepared.commit,
        )

    def renew(self, *, slot_id, token, lease_seconds):
        self._post(
            f"slots/{slot_id}/renew/",
            {"token": str(token), "lease_seconds": lease_seconds},
            idempotency_key=None,
            bound=self.api.config.heartbeat_retry_seconds,
        )

    def release(self, *, slot_id, token):
        """Reset the copy here (to the base it was leased from), then free the row on the server;
        a copy that cannot be reset is reported broken."""
        self.release_start(slot_id=slot_id, token=token)()

    def release_start(self, *, slot_id, token):
        """``release`` with the reset in a thread of its own: the returned function waits for it,
        then frees the row on the server."""
        from workcopy import slots

        held = self._held.pop(int(slot_id), None)
        outcome: dict[str, Any] = {}

        def work() -> None:
            started = time.monotonic()
            try:
                slots.reset(held.spec, held.path, held.commit)
                outcome["broken"] = ""
            except SlotBroken as exc:
                outcome["broken"] = exc.message
            except BaseException as exc:  # raised again by wait(), as release raised it
                outcome["error"] = exc
            finally:
                self.timed.add("reset", started)

        thread = None
        if held is not None:
            thread = threading.Thread(target=work, name=f"reset-slot-{slot_id}", daemon=True)
            thread.start()

        def wait() -> None:
            if thread is not None:
                thread.join()
                if "error" in outcome:
                    raise outcome["error"]
            commit = held.commit if held is not None else ""
            self._give_back(slot_id, token, commit, broken_reason=outcome.get("broken", ""))

        return wait

    def _give_back(self, slot_id, token, commit: str, *, broken_reason: str = "") -> None:
        body = {"token": str(token), "commit": commit}
        if broken_reason:
            body["broken_reason"] = broken_reason[:2000]
        self._post(f"slots/{slot_id}/release/", body, bound=self.api.config.finish_retry_seconds)

    def publish(self, *, task, path, branch, base):
        """The result leaves this host: pushed to the repository's push_url, else sent to the
        server's results repository as a git bundle of the commits after ``base``."""
        from workcopy import git

        if task.push_url:
            started = time.monotonic()
            try:
                git.push(path, task.push_url, branch)
            finally:
                self.timed.add(self.name, started)
            return f"git fetch {strip_credentials(task.push_url)} {branch}"  # shown to users: no token
        with tempfile.TemporaryDirectory(prefix="bundle-", dir=_tmp_root()) as scratch:
            bundle = Path(scratch) / "result.bundle"
            git.bundle_create(path, bundle, branch, base=base)
            digest, size = file_sha256(bundle)
            response = self._post(
                f"attempts/{task.attempt_id}/results/",
                content=lambda: _chunks(bundle, size),
                headers={
                    "Content-Length": str(size),
                    "Content-Type": "application/x-git-bundle",
                    "X-Result-Branch": branch,
                    "X-Result-Base": base,
                    "X-Content-SHA256": digest,
                },
                lease_token=task.lease_token,
            )
        return response.json()["fetch"]


def _tmp_root() -> str:
    from django.conf import settings

    root = Path(settings.TMP_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def _fetch_ttl() -> float:
    from django.conf import settings

    return float(getattr(settings, "REPO_POOL_FETCH_TTL", 0))


class HttpArtifacts(_HttpPort):
    name = "artifacts"
    # An attempt's artifacts are uploaded side by side (the client is thread-safe): each upload is
    # a round trip that mostly waits on the server.
    parallel_uploads = 4

    def store(self, *, task, path, name, kind, content_type, metadata, role=""):
        path = Path(path)
        digest, size = file_sha256(path)  # first: the server checks what it receives against it
        # X-Artifact-Role: the server links it in the same transaction (no artifact-links/ call).
        linking = {"X-Artifact-Role": role} if role else {}
        response = self._post(
            f"attempts/{task.attempt_id}/artifacts/",
            content=lambda: _chunks(path, size),
            headers={
                **linking,
                # Sized, not chunked: the server refuses what is too large before reading it.
                "Content-Length": str(size),
                "Content-Type": content_type or "application/octet-stream",
                "X-Content-SHA256": digest,
                "X-Artifact-Name": _header_safe(name),
                "X-Artifact-Kind": kind,
                "X-Artifact-Metadata": json.dumps(metadata or {}, separators=(",", ":"), default=str),
            },
            lease_token=task.lease_token,
        )
        return uuid.UUID(str(response.json()["id"]))


def _header_safe(value: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "_" for c in value)[:255]


def file_sha256(path: Path) -> tuple[str, int]:
    """The file's SHA-256 and size, read once: exactly these bytes are then sent (``_chunks``)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _chunks(path: Path, size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of the file, a chunk at a time (a file still growing sends no more)."""
    left = size
    with open(path, "rb") as fh:
        while left > 0 and (chunk := fh.read(min(CHUNK, left))):
            left -= len(chunk)
            yield chunk


_clients: dict[ApiConfig, ApiClient] = {}
_clients_lock = threading.Lock()


def shared_client(config: ApiConfig) -> ApiClient:
    """One client per configuration in a process: every run (and thread) reuses its connections."""
    with _clients_lock:
        client = _clients.get(config)
        if client is None:
            client = _clients[config] = ApiClient(config)
        return client


def ports(config: ApiConfig, *, pool_root: Path | None = None):
    """The three HTTP ports over the process's client, as the pipeline's ``Ports``."""
    from agentrunner.runner.ports import Ports, Timed

    api = shared_client(config)
    timed = Timed()
    return Ports(
        HttpRegistry(api, config.registry_url, timed),
        HttpPool(api, config.pool_url, timed, pool_root=pool_root),
        HttpArtifacts(api, config.artifacts_url, timed),
        timed,
    )


_announced: set[tuple[str, str]] = set()
_announce_lock = threading.Lock()


def ports_from_settings():
    """HTTP ports when this host is configured as a remote runner, else None. The host announces
    itself once per process before its first call (``runagent`` does it at start, to fail early;
    a Celery worker on its first task)."""
    config = ApiConfig.from_settings()
    if config is None:
        return None
    with _announce_lock:
        if (config.registry_url, config.host) not in _announced:
            announce_host(config)
    return ports(config)


def announce_host(config: ApiConfig, *, capacity: dict[str, int] | None = None) -> None:
    """Tell the server this host exists (its name, what it can hold)."""
    from django.conf import settings

    api = ApiClient(config)
    try:
        HttpRegistry(api, config.registry_url).announce(
            name=config.host,
            capacity=capacity if capacity is not None else dict(settings.AGENTRUNNER_HOST_CAPACITY),
            version=RUNNER_VERSION,
        )
    finally:
        api.close()
    _announced.add((config.registry_url, config.host))
