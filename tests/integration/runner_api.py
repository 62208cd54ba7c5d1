"""A runner host's side of the runner API (/api/runner/v1/), spelled out call by call, so each test
shows what goes over the wire: runner token, `X-Lease-Token` fencing, `Idempotency-Key` per POST.
(The runner's own adapter, agentrunner/runner/http.py, retries and buffers; these calls do not,
so a test sees exactly what the server answered.)"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import httpx2 as httpx

from tests.integration.deployment import Deployment, ServiceClient, expect

PREFIX = "/api/runner/v1/"


def new_key() -> str:
    return f"it:{uuid.uuid4().hex}"


@dataclass
class Claimed:
    task: dict
    attempt_id: int
    number: int
    lease_token: str

    @classmethod
    def from_body(cls, body: dict) -> Claimed:
        """From a 200 answer of claim/."""
        attempt = body["attempt"]
        return cls(body["task"], attempt["id"], attempt["number"], attempt["lease_token"])

    @property
    def task_id(self) -> str:
        return str(self.task["id"])


class RunnerAPI:
    def __init__(self, deployment: Deployment) -> None:
        self.registry: ServiceClient = deployment.runner_client("registry")
        self.pool: ServiceClient = deployment.runner_client("pool")
        self.artifacts: ServiceClient = deployment.runner_client("artifacts")

    def close(self) -> None:
        for client in (self.registry, self.pool, self.artifacts):
            client.close()

    # --- the raw call ---------------------------------------------------------------------------
    def post(
        self,
        client: ServiceClient,
        path: str,
        *,
        json: dict | None = None,
        key: str | None = "new",
        lease: str | None = None,
        **kwargs,
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Idempotency-Key"] = new_key() if key == "new" else key
        if lease is not None:
            headers["X-Lease-Token"] = lease
        return client.post(PREFIX + path, json=json, headers=headers, **kwargs)

    # --- attempts -------------------------------------------------------------------------------
    def claim_response(self, *, runner_id: str, task_id: str | None = None, wait: float = 0, key: str = "new"):
        body: dict = {"runner_id": runner_id, "wait": wait}
        if task_id is not None:
            body["task_id"] = task_id
        return self.post(self.registry, "claim/", json=body, key=key, timeout=wait + 60)

    def claim(self, *, runner_id: str, task_id: str | None = None, wait: float = 0) -> Claimed | None:
        response = self.claim_response(runner_id=runner_id, task_id=task_id, wait=wait)
        if response.status_code == 204:
            return None
        return Claimed.from_body(expect(response, 200))

    def heartbeat(self, claimed: Claimed, *, lease: str | None = None, **body) -> httpx.Response:
        return self.post(
            self.registry,
            f"attempts/{claimed.attempt_id}/heartbeat/",
            json=body,
            key=None,
            lease=lease or claimed.lease_token,
        )

    def events(self, claimed: Claimed, events: list[dict], *, key: str = "new", lease: str | None = None):
        return self.post(
            self.registry,
            f"attempts/{claimed.attempt_id}/events/",
            json={"events": events},
            key=key,
            lease=lease or claimed.lease_token,
        )

    def usage(self, claimed: Claimed, *, prompt: int, completion: int, cost: str | None, key: str = "new"):
        body = {"prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": cost}
        return self.post(
            self.registry, f"attempts/{claimed.attempt_id}/usage/", json=body, key=key, lease=claimed.lease_token
        )

    def upload(
        self,
        claimed: Claimed,
        content: bytes,
        *,
        name: str,
        kind: str,
        content_type: str = "application/octet-stream",
        sha256: str | None = None,
        key: str = "new",
    ) -> httpx.Response:
        headers = {
            "Content-Type": content_type,
            "X-Content-SHA256": sha256 or hashlib.sha256(content).hexdigest(),
            "X-Artifact-Name": name,
            "X-Artifact-Kind": kind,
        }
        return self.post(
            self.artifacts,
            f"attempts/{claimed.attempt_id}/artifacts/",
            content=content,
            headers=headers,
            key=key,
            lease=claimed.lease_token,
        )

    def link(self, claimed: Claimed, artifact_id: str, role: str, *, key: str = "new") -> httpx.Response:
        return self.post(
            self.registry,
            f"attempts/{claimed.attempt_id}/artifact-links/",
            json={"artifact_id": artifact_id, "role": role},
            key=key,
            lease=claimed.lease_token,
        )

    def finish(
        self,
        claimed: Claimed,
        status: str = "succeeded",
        *,
        failure_reason: str = "",
        message: str = "",
        retry: bool = False,
        result: dict | None = None,
        metrics: dict | None = None,
        key: str = "new",
        lease: str | None = None,
    ) -> httpx.Response:
        body = {
            "status": status,
            "failure_reason": failure_reason,
            "message": message,
            "retry": retry,
            "result": result or {},
            "metrics": metrics or {},
        }
        return self.post(
            self.registry,
            f"attempts/{claimed.attempt_id}/finish/",
            json=body,
            key=key,
            lease=lease or claimed.lease_token,
        )

    def results(self, claimed: Claimed, bundle: bytes, *, branch: str, base: str, key: str = "new"):
        headers = {
            "Content-Type": "application/x-git-bundle",
            "X-Result-Branch": branch,
            "X-Result-Base": base,
            "X-Content-SHA256": hashlib.sha256(bundle).hexdigest(),
        }
        return self.post(
            self.pool,
            f"attempts/{claimed.attempt_id}/results/",
            content=bundle,
            headers=headers,
            key=key,
            lease=claimed.lease_token,
        )

    # --- hosts and slots ------------------------------------------------------------------------
    def register_host(self, name: str, capacity: dict[str, int], *, version: str = "it") -> httpx.Response:
        return self.post(self.pool, "hosts/", json={"name": name, "capacity": capacity, "version": version})

    def allocate(
        self,
        repository_id: int,
        *,
        host: str,
        holder: str,
        lease_seconds: int = 600,
        wait_seconds: float = 0,
        attempt_id: int | None = None,
        lease: str | None = None,
    ) -> httpx.Response:
        """A slot of this token's host `host` (a token may register several); with `attempt_id` it is recorded on that attempt, and
        `lease` (the attempt's lease token) fences the call."""
        body = {
            "repository_id": repository_id,
            "holder": holder,
            "lease_seconds": lease_seconds,
            "wait_seconds": wait_seconds,
            "host": host,
        }
        if attempt_id is not None:
            body["attempt_id"] = attempt_id
        return self.post(self.pool, "slots/allocate/", json=body, lease=lease, timeout=wait_seconds + 60)

    def prepared(self, slot_id: int, token: str, *, commit: str, setup_hash: str = "", fetched: bool = True):
        body = {"token": token, "commit": commit, "setup_hash": setup_hash, "fetched": fetched}
        return self.post(self.pool, f"slots/{slot_id}/prepared/", json=body)

    def renew(self, slot_id: int, token: str, lease_seconds: int | None = None) -> httpx.Response:
        body: dict = {"token": token}
        if lease_seconds is not None:
            body["lease_seconds"] = lease_seconds
        return self.post(self.pool, f"slots/{slot_id}/renew/", json=body, key=None)

    def release(self, slot_id: int, token: str, *, commit: str = "", broken_reason: str | None = None):
        body: dict = {"token": token, "commit": commit}
        if broken_reason is not None:
            body["broken_reason"] = broken_reason
        return self.post(self.pool, f"slots/{slot_id}/release/", json=body)
