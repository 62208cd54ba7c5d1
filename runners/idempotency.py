"""Idempotency keys for the runner API: a request retried after a lost response gets the first
answer again instead of repeating its effect.

Every POST of the runner API except heartbeat and renew carries ``Idempotency-Key`` (1-128
characters ``[A-Za-z0-9._:-]``). Records are kept per runner token for 24 hours:
- same key, same request (method, path, lease token, body): the stored status and body, replayed
  (header ``Idempotent-Replayed: true``);
- same key, another request: 422 ``idempotency_key_reused``, nothing done.

Where the effect is a database write (``respond``), the effect and the stored answer commit in one
transaction: either both exist or neither, and a concurrent duplicate fails on the unique
(token, key) row, rolls its effect back and replays the winner's answer. Where the effect is slow
I/O (uploads, ``respond_after_io``), the key is checked first, the effect runs, then the answer is
recorded: a duplicate racing the first can at worst store the same bytes twice.

Only successes (2xx other than 204) are recorded: a refusal changed nothing, so its retry may be
judged afresh."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from runners.errors import IdempotencyKeyMissing, IdempotencyKeyReused
from runners.models import IdempotencyRecord, RunnerToken

HEADER = "Idempotency-Key"
KEY_RE = re.compile(r"\A[A-Za-z0-9._:-]{1,128}\Z")
KEEP = timedelta(hours=24)
PURGE_CHANCE = 0.01


@dataclass(frozen=True)
class Idempotency:
    token: RunnerToken
    key: str
    request_hash: str


def from_request(request, *, body: bool = True, extra: Iterable[str] = ()) -> Idempotency:
    """The key and the request's fingerprint. ``body``: hash the parsed JSON body; a raw upload
    passes False and names its content by ``extra`` (its sha256 header, name, kind...)."""
    key = request.headers.get(HEADER, "")
    if not key:
        raise IdempotencyKeyMissing(f"This request needs an {HEADER} header (1-128 characters [A-Za-z0-9._:-]).")
    if not KEY_RE.match(key):
        raise IdempotencyKeyMissing(f"{HEADER} must be 1-128 characters of [A-Za-z0-9._:-].", code="invalid")
    digest = hashlib.sha256()
    for part in (request.method, request.path, request.headers.get("X-Lease-Token", ""), *extra):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    if body:
        digest.update(json.dumps(request.data, sort_keys=True, separators=(",", ":"), default=str).encode())
    return Idempotency(token=request.auth, key=key, request_hash=digest.hexdigest())


def _stored(idem: Idempotency) -> Response | None:
    record = IdempotencyRecord.objects.filter(token=idem.token, key=idem.key).first()
    if record is None:
        return None
    if record.created_at < timezone.now() - KEEP:
        IdempotencyRecord.objects.filter(pk=record.pk).delete()  # expired: the key is free again
        return None
    if record.request_hash != idem.request_hash:
        raise IdempotencyKeyReused(
            f"{HEADER} {idem.key!r} was used for another request; use a new key for a new request."
        )
    response = Response(record.body, status=record.status_code)
    response["Idempotent-Replayed"] = "true"
    return response


def _record(idem: Idempotency, response: Response) -> None:
    if not (200 <= response.status_code < 300) or response.status_code == 204:
        return
    body = json.loads(JSONRenderer().render(response.data)) if response.data is not None else None
    IdempotencyRecord.objects.create(
        token=idem.token, key=idem.key, request_hash=idem.request_hash, status_code=response.status_code, body=body
    )
    if random.random() < PURGE_CHANCE:  # now and then, not on every write: old records go
        transaction.on_commit(purge_expired)


def respond(idem: Idempotency, effect: Callable[[], Response | None]) -> Response | None:
    """Replay the stored answer, or run ``effect`` and record its answer in the same transaction.
    ``effect`` returning None means nothing happened (nothing recorded)."""
    replay = _stored(idem)
    if replay is not None:
        return replay
    try:
        with transaction.atomic():
            response = effect()
            if response is not None:
                _record(idem, response)
            return response
    except IntegrityError:
        replay = _stored(idem)  # a concurrent request with this key won: its effect stands, ours is undone
        if replay is None:
            raise
        return replay


def check(idem: Idempotency) -> Response | None:
    """The stored answer for this key, if any (422 when the key served another request)."""
    return _stored(idem)


def respond_after_io(idem: Idempotency, effect: Callable[[], Response]) -> Response:
    """For effects that are slow I/O (an upload): check the key, run the effect outside any
    transaction, then record its answer."""
    replay = _stored(idem)
    if replay is not None:
        return replay
    response = effect()
    try:
        with transaction.atomic():
            _record(idem, response)
    except IntegrityError:
        return _stored(idem) or response
    return response


def purge_expired() -> int:
    """Delete records past their 24 hours; returns how many."""
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=timezone.now() - KEEP).delete()
    return deleted
