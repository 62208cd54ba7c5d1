"""The tool-calling loop: call the model, run its tool calls, append the results, repeat, until
`finish` or a limit. No Django here: it works on a folder and an LLM client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from agentrunner.agent.repomap import repository_map
from agentrunner.agent.tools import SYSTEM_PROMPT, TOOL_NAMES, TOOLS
from agentrunner.agent.workspace import TestRunner, ToolError, Workspace
from agentrunner.llm.client import LLMClient
from agentrunner.llm.errors import LLMError
from common.outcomes import AGENT_FINISHED, AGENT_STOP_REASONS

# Stop reasons, each with the task failure reason the runner records: the one vocabulary.
FINISHED = AGENT_FINISHED
OUTCOME_REASONS = AGENT_STOP_REASONS
REPEAT_LIMIT = 3
IDLE_LIMIT = 3
TOOL_RESULT_LIMIT = 20_000


@dataclass
class Budget:
    max_steps: int | None = 50
    max_tokens: int | None = None
    max_cost: Decimal | None = None
    deadline: float | None = None  # time.monotonic() value


@dataclass
class AgentResult:
    outcome: str
    message: str = ""
    summary: str = ""
    steps: int = 0
    llm_error: LLMError | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == FINISHED

    @property
    def failure_reason(self) -> str:
        return OUTCOME_REASONS[self.outcome]


EventSink = Callable[[str, str, dict[str, Any]], None]


@dataclass
class Agent:
    client: LLMClient
    workspace: Workspace
    run_tests: TestRunner | None = None
    model: str | None = None
    on_event: EventSink = lambda kind, message, data: None
    should_cancel: Callable[[], bool] = lambda: False
    messages: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0

    def start(self, instructions: str, budget: Budget) -> AgentResult:
        self.messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{instructions.strip()}\n\n{repository_map(self.workspace)}"},
        ]
        return self._loop(budget)

    def resume(self, feedback: str, budget: Budget) -> AgentResult:
        """Another round in the same conversation (e.g. after the tests failed)."""
        self.messages.append({"role": "user", "content": feedback})
        return self._loop(budget)

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self, budget: Budget) -> AgentResult:
        last_failure: tuple[str, str] | None = None
        repeats = 0
        idle = 0
        while True:
            limit = self._check_limits(budget)
            if limit:
                return limit
            try:
                response = self.client.complete(
                    self.messages,
                    TOOLS,
                    model=self.model,
                    on_retry=self._report_retry,
                    should_cancel=self.should_cancel,
                )
            except LLMError as error:
                if self.should_cancel():
                    return AgentResult("cancelled", "cancelled while waiting for the model", steps=self.steps)
                self.on_event("llm_error", error.message, {"kind": error.kind, "status": error.status})
                return AgentResult("llm_error", f"{error.kind}: {error.message}", steps=self.steps, llm_error=error)
            self.steps += 1
            totals = self.client.totals
            self.on_event(
                "llm_call",
                f"step {self.steps}: {response.prompt_tokens}+{response.completion_tokens} tokens in {response.duration:.2f}s",
                {
                    "step": self.steps,
                    "model": response.model,
                    "prompt_tokens": response.prompt_tokens,
                    "completion_tokens": response.completion_tokens,
                    "duration": round(response.duration, 4),
                    "cost_usd": None if response.cost is None else str(response.cost),
                    "total_tokens": totals.total_tokens,
                },
            )
            self.messages.append(response.message)
            if not response.tool_calls:
                idle += 1
                if idle >= IDLE_LIMIT:
                    return AgentResult(
                        "no_progress", f"stuck: {IDLE_LIMIT} replies in a row without a tool call", steps=self.steps
                    )
                self.messages.append(
                    {
                        "role": "user",
                        "content": "Use the tools to make the change, then call finish. Reply with a tool call.",
                    }
                )
                continue
            idle = 0
            for call in response.tool_calls:
                name = call["function"]["name"]
                raw_args = call["function"]["arguments"]
                result, ok, finished = self._run_tool(name, raw_args)
                self.messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": result[:TOOL_RESULT_LIMIT]}
                )
                if finished is not None:
                    # Answer any other calls of this reply so the conversation stays well formed.
                    for rest in response.tool_calls[response.tool_calls.index(call) + 1 :]:
                        self.messages.append(
                            {"role": "tool", "tool_call_id": rest["id"], "content": "skipped: finish was called"}
                        )
                    return AgentResult(FINISHED, "finished", summary=finished, steps=self.steps)
                if ok:
                    last_failure, repeats = None, 0
                else:
                    key = (name, raw_args)
                    repeats = repeats + 1 if key == last_failure else 1
                    last_failure = key
                    if repeats >= REPEAT_LIMIT:
                        return AgentResult(
                            "stuck",
                            f"stuck: the same failing {name} call {REPEAT_LIMIT} times in a row",
                            steps=self.steps,
                        )

    def _check_limits(self, budget: Budget) -> AgentResult | None:
        totals = self.client.totals
        if self.should_cancel():
            return AgentResult("cancelled", "cancelled by request", steps=self.steps)
        if budget.deadline is not None and time.monotonic() >= budget.deadline:
            return AgentResult("timeout", "the task's time ran out", steps=self.steps)
        if budget.max_steps is not None and self.steps >= budget.max_steps:
            return AgentResult("budget_exceeded", f"step limit of {budget.max_steps} reached", steps=self.steps)
        if budget.max_tokens is not None and totals.total_tokens >= budget.max_tokens:
            return AgentResult(
                "budget_exceeded",
                f"token limit of {budget.max_tokens} reached ({totals.total_tokens} used)",
                steps=self.steps,
            )
        if budget.max_cost is not None and not totals.cost_unknown and totals.cost >= budget.max_cost:
            return AgentResult(
                "budget_exceeded",
                f"cost limit of ${budget.max_cost} reached (${totals.cost:.6f} spent)",
                steps=self.steps,
            )
        return None

    def _report_retry(self, error: LLMError, attempt: int, wait: float) -> None:
        self.on_event(
            "llm_retry",
            f"{error.kind}: retrying in {wait:.1f}s",
            {"kind": error.kind, "attempt": attempt, "wait": round(wait, 3), "status": error.status},
        )

    def _run_tool(self, name: str, raw_args: str) -> tuple[str, bool, str | None]:
        """Returns (result text, ok, finish summary or None). Never raises."""
        started = time.monotonic()
        finished = None
        path = None
        try:
            try:
                args = json.loads(raw_args) if raw_args.strip() else {}
            except ValueError as exc:
                raise ToolError(f"the arguments are not valid JSON ({exc}); send a JSON object") from None
            if not isinstance(args, dict):
                raise ToolError("the arguments must be a JSON object")
            path = args.get("path")
            if name not in TOOL_NAMES:
                raise ToolError(f"unknown tool {name!r}; the tools are: {', '.join(TOOL_NAMES)}")
            result, finished, failed = self._dispatch(name, args)
            ok = not failed
        except ToolError as exc:
            result, ok = f"error: {exc}", False
        except TypeError as exc:  # wrong or missing arguments
            result, ok = f"error: bad arguments for {name}: {exc}", False
        except OSError as exc:
            result, ok = f"error: {exc.strerror or exc}", False
        data = {"tool": name, "ok": ok, "duration": round(time.monotonic() - started, 4)}
        if isinstance(path, str):
            data["path"] = path
        if not ok:
            data["error"] = result[:500]
        self.on_event(
            "tool_call", f"{name}{' ' + path if isinstance(path, str) else ''}: {'ok' if ok else 'error'}", data
        )
        self.client.transcript.record(
            "tool_call",
            name=name,
            arguments=raw_args[:10_000],
            ok=ok,
            result=result[:10_000],
            duration=data["duration"],
        )
        return result, ok, finished

    def _dispatch(self, name: str, args: dict) -> tuple[str, str | None, bool]:
        """Returns (result, finish summary, failed). A failing test run counts as a failed action
        for the stuck detector, so re-running the same failing tests without a change stops."""
        ws = self.workspace
        allowed = {
            "list_files": {"path"},
            "read_file": {"path", "start_line", "end_line"},
            "search_code": {"pattern", "path"},
            "write_file": {"path", "content"},
            "edit_file": {"path", "old_text", "new_text"},
            "delete_file": {"path"},
            "run_tests": {"args"},
            "finish": {"summary"},
        }[name]
        unknown = set(args) - allowed
        if unknown:
            raise ToolError(f"unknown argument(s) for {name}: {', '.join(sorted(unknown))}")
        if name == "finish":
            if ws.broken:
                problems = "; ".join(f"{p}: {e}" for p, e in sorted(ws.broken.items()))
                raise ToolError(f"cannot finish while changed files do not parse: {problems}")
            summary = args.get("summary")
            if not isinstance(summary, str) or not summary.strip():
                raise ToolError("finish needs a non-empty summary")
            return "done", summary.strip(), False
        if name == "run_tests":
            if self.run_tests is None:
                raise ToolError("running the tests is not available here")
            extra = args.get("args") or []
            if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
                raise ToolError("args must be a list of strings")
            code, tail = self.run_tests(extra)
            status = "timed out" if code is None else f"exit code {code}"
            return f"{status}\n{tail}", None, code != 0
        return getattr(ws, name)(**args), None, False
