"""The end-of-run summary as a person reads it on a terminal."""

from __future__ import annotations

import logging
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
        lines.append(f"tests     {'passed' if summary.tests_passed else 'failed'}")
    cost = f"${Decimal(summary.cost_usd):.4f}" if summary.cost_usd is not None else "cost unknown"
    tokens = summary.prompt_tokens + summary.completion_tokens
    lines.append(f"llm       {summary.llm_calls} calls · {tokens:,} tokens · {cost}")
    lines.append("timings   " + " ".join(f"{k}={v:.2f}s" for k, v in summary.timings.items()))
    if summary.artifacts:
        lines.append(
            "artifacts " + " ".join(f"{kind}={artifact_id}" for kind, artifact_id in summary.artifacts.items())
        )
    if summary.spooled:
        lines.append(f"spooled   {', '.join(summary.spooled)} (uploaded by a later attempt)")
    lines.append(f"api       {summary.api_url}")
    lines.append(f"admin     {summary.admin_url}")
    return "\n".join(lines)


def quiet_logs(verbosity: int) -> None:
    """On a terminal the progress lines say what the run log says; -v 2 brings the log back."""
    if verbosity < 2:
        logging.getLogger("agentrunner.runner").setLevel(logging.WARNING)
