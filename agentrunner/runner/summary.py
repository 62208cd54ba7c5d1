"""The end-of-run summary as a person reads it on a terminal."""

from __future__ import annotations

import logging
import os
import sys
import threading
from decimal import Decimal

from agentrunner.runner.pipeline import RunSummary


def format_summary(summary: RunSummary) -> str:
    lines = ["", f"task      {summary.task_id}  {summary.title}"]
    status = summary.status + (f" ({summary.failure_reason})" if summary.failure_reason else "")
    lines.append(f"status    {status}  attempt {summary.attempt}")
    if summary.message and summary.status != "succeeded":
        lines.append(f"reason    {summary.message}")
    if summary.summary:
        lines.append(f"summary   {summary.summary}")
    if summary.branch:
        lines.append(f"branch    {summary.branch} @ {summary.commit[:12]}")
        lines.append(f"fetch     {summary.fetch}")
    if summary.files_changed:
        lines.append(f"files     {', '.join(summary.files_changed)}")
    if summary.tests_passed is not None:
        line = f"tests     {'passed' if summary.tests_passed else 'failed'}"
        results = summary.test_results
        if results:
            counts = [f"{results[k]} {k}" for k in ("failed", "errored", "passed", "skipped") if results.get(k)]
            line += f" ({', '.join(counts) or 'no tests ran'}; {results.get('source')})"
        if summary.tests_reused:
            line += " · the final check is the agent's own passing run on the same tree"
        lines.append(line)
    if summary.recorded_cost_usd is not None:
        # A replay bills nothing: the recording's price is shown as what it is.
        cost = f"replayed: recorded cost ${Decimal(summary.recorded_cost_usd):.4f}, spent $0"
    elif summary.cost_usd is not None:
        cost = f"${Decimal(summary.cost_usd):.4f}"
    else:
        cost = "cost unknown"
    tokens = summary.prompt_tokens + summary.completion_tokens
    lines.append(f"llm       {summary.llm_calls} calls · {tokens:,} tokens · {cost}")
    lines.append("timings   " + " ".join(f"{k}={v:.2f}s" for k, v in summary.timings.items()))
    if summary.artifacts:
        lines.append(
            "artifacts " + " ".join(f"{kind}={artifact_id}" for kind, artifact_id in summary.artifacts.items())
        )
    if summary.spooled:
        lines.append(f"spooled   {', '.join(summary.spooled)} (uploaded by a later attempt)")
    if summary.sandbox:
        lines.append(f"sandbox   {summary.sandbox}")
    lines.append(f"api       {summary.api_url}")
    lines.append(f"admin     {summary.admin_url}")
    if summary.status in ("queued", "pending"):
        lines.append(f"next      {requeued_hint(summary)}")
    return "\n".join(lines)


def requeued_hint(summary: RunSummary) -> str:
    """What to do with a task that went back to the queue after a transient failure."""
    base = origin(summary.api_url)
    return (
        f"the task is queued again; run it now with `manage.py runagent {summary.task_id}` (or let a worker "
        f'take it), or cancel it with `curl -X POST -H "$H" {base}/api/tasks/{summary.task_id}/cancel/`'
    )


def origin(url: str) -> str:
    return url.split("/api/", 1)[0] if "/api/" in url else url


def quiet_logs(verbosity: int) -> None:
    """On a terminal the progress lines say what the run log says; -v 2 brings the log back."""
    if verbosity < 2:
        logging.getLogger("agentrunner.runner").setLevel(logging.WARNING)


class ClosedPipe(KeyboardInterrupt):
    """The reader of our output went away (`make demo | head -5`): wind down like on SIGTERM."""


def silence_output() -> None:
    """Point stdout and stderr at /dev/null: later writes (and the flush at exit) must not fail
    again once the reader is gone."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):  # not a real file (a test's StringIO): nothing to redirect
            pass
    os.close(devnull)


class Progress:
    """Writes live progress lines to a command's stderr. When the pipe is closed it silences the
    output and raises ClosedPipe once, so the running task winds down (slot released, task queued
    again) instead of staying `running` until a reaper finds it; later lines are dropped."""

    def __init__(self, stream):
        self.stream = stream
        self.closed = False
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                self.stream.write(text)
                self.stream.flush()
            except BrokenPipeError:
                self.closed = True
                silence_output()
                raise ClosedPipe from None
