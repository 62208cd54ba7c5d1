"""The one outcome vocabulary: how an attempt ends, why it failed, and whether another attempt can help.

Free of Django, so the runner, the agent, the registry and both port adapters (in-process and HTTP)
speak the same words. Three things live here and nowhere else:

- the values: task statuses an attempt ends in, failure reasons (the registry's ``FailureReason``
  is built from ``Reason``), the agent's stop reasons (``AGENT_STOP_REASONS``) and the LLM error
  kinds a retry can cure (``LLM_RETRYABLE_KINDS``);
- the exceptions a runner catches from its ports (``RunnerError`` and subclasses). They are domain
  errors too, so the API's exception handler maps each to its HTTP status (409, 503, 400), and the
  in-process services raise the very classes the HTTP adapter raises on those statuses;
- ``OUTCOMES``, the one table from those exceptions to (status, failure reason, retryable), and
  ``outcome_for`` that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from common.errors import ConflictError, DomainError, UnavailableError


class Status(StrEnum):
    """How an attempt ends (a task's terminal statuses)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Reason(StrEnum):
    """Why a task failed (``Task.failure_reason``)."""

    IMPLEMENTATION_FAILED = "implementation_failed"
    TESTS_FAILED = "tests_failed"
    TIMEOUT = "timeout"
    GIT_ERROR = "git_error"
    WORKSPACE_ERROR = "workspace_error"
    LLM_ERROR = "llm_error"
    BUDGET_EXCEEDED = "budget_exceeded"
    CANCELLED = "cancelled"
    DEPENDENCY_FAILED = "dependency_failed"
    INFRASTRUCTURE_ERROR = "infrastructure_error"


# The agent loop's stop reasons, each with the failure reason the runner records ("" = success).
AGENT_FINISHED = "finished"
AGENT_STOP_REASONS: dict[str, str] = {
    AGENT_FINISHED: "",
    "budget_exceeded": Reason.BUDGET_EXCEEDED,
    "timeout": Reason.TIMEOUT,
    "stuck": Reason.IMPLEMENTATION_FAILED,
    "no_progress": Reason.IMPLEMENTATION_FAILED,
    "cancelled": Reason.CANCELLED,
    "llm_error": Reason.LLM_ERROR,
}

# LLM error kinds another attempt (or a retry of the call) can cure.
LLM_RETRYABLE_KINDS = frozenset({"rate_limited", "timeout", "connection", "server_error", "malformed_response"})


@dataclass
class Outcome:
    """How one attempt ends: what the runner sends to ``finish``."""

    status: str  # a Status
    reason: str = ""  # a Reason, "" when succeeded
    message: str = ""
    retry: bool = False


# --- what a runner catches ------------------------------------------------------------------------
class RunnerError(DomainError):
    """A failure a runner meets through its ports; ``message`` says what happened."""

    code = "runner_error"


class LeaseLost(RunnerError, ConflictError):
    """This runner no longer holds what it works on (slot lease or attempt): stop, record nothing."""

    code = "lease_lost"


class TokenRejected(LeaseLost):
    """The server refused the runner token (401: unknown or revoked). The runner may do nothing
    more: like a lost lease, the attempt stops and its result is not recorded; the run says this
    cause, not a lost lease."""

    code = "token_rejected"


class NoSlotAvailable(RunnerError, UnavailableError):
    code = "no_slot_available"


class SlotBroken(RunnerError):
    """The working copy cannot be used (clone, reset or setup failed); another slot may serve."""

    code = "slot_broken"


class GitError(RunnerError):
    code = "git_error"


class RefNotFound(GitError):
    code = "ref_not_found"
    field = "ref"


class ServiceUnavailable(RunnerError, UnavailableError):
    """The registry, pool or artifact store cannot be reached or answered 5xx past every retry."""

    code = "service_unavailable"


@dataclass(frozen=True)
class Mapping:
    status: str
    reason: str
    retry: bool


# The one table: the most specific class first (``outcome_for`` takes the first that matches).
OUTCOMES: tuple[tuple[type[BaseException], Mapping], ...] = (
    (LeaseLost, Mapping(Status.FAILED, Reason.INFRASTRUCTURE_ERROR, True)),
    (NoSlotAvailable, Mapping(Status.FAILED, Reason.WORKSPACE_ERROR, True)),
    (SlotBroken, Mapping(Status.FAILED, Reason.WORKSPACE_ERROR, True)),
    (RefNotFound, Mapping(Status.FAILED, Reason.GIT_ERROR, False)),
    (GitError, Mapping(Status.FAILED, Reason.GIT_ERROR, False)),
    (ServiceUnavailable, Mapping(Status.FAILED, Reason.INFRASTRUCTURE_ERROR, True)),
    (KeyboardInterrupt, Mapping(Status.FAILED, Reason.INFRASTRUCTURE_ERROR, True)),
)
# Anything else a runner did not expect is its own failure: another attempt may not meet it.
UNEXPECTED = Mapping(Status.FAILED, Reason.INFRASTRUCTURE_ERROR, True)


def outcome_for(exc: BaseException, message: str | None = None) -> Outcome:
    """The outcome of an attempt that ended with ``exc``, from ``OUTCOMES``."""
    mapping = next((m for cls, m in OUTCOMES if isinstance(exc, cls)), UNEXPECTED)
    if message is None:
        if mapping is UNEXPECTED:
            message = f"{type(exc).__name__}: {exc}"
        else:
            message = getattr(exc, "message", None) or str(exc)
    return Outcome(mapping.status, mapping.reason, message, mapping.retry)


def agent_outcome(stop_reason: str, message: str, *, llm_error_kind: str = "") -> Outcome:
    """The outcome of an agent that stopped for ``stop_reason`` (not ``finished``)."""
    reason = AGENT_STOP_REASONS[stop_reason]
    if stop_reason == "cancelled":
        return Outcome(Status.CANCELLED, reason, message)
    return Outcome(
        Status.FAILED, reason, message, retry=reason == Reason.LLM_ERROR and llm_error_kind in LLM_RETRYABLE_KINDS
    )
