"""The runner pipeline: claim -> lease -> prepare -> agent -> tests -> commit/push -> artifacts ->
finish -> release. ``run_task`` is the one entry point; the command and the Celery task wrap it.

Guarantees: the slot is released with its token on every path (success, failure, cancellation,
an exception here); every attempt ends in ``finish`` with a reason; transient failures go back to
the queue while attempts remain; artifacts that could not be stored are spooled, not lost.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

from agentrunner.agent.loop import Agent, Budget
from agentrunner.agent.workspace import Workspace
from agentrunner.llm.client import LLMClient, Transcript
from agentrunner.llm.config import (
    TASK_CONFIG_KEYS,
    LLMConfig,
    LLMNotConfigured,
    config_problem,
    from_settings,
    lacks_live_model,
)
from agentrunner.runner import testreport
from agentrunner.runner.ports import ClaimedTask, Ports, SlotLease
from common.outcomes import (
    GitError,
    LeaseLost,
    NoSlotAvailable,
    Outcome,
    Reason,
    RefNotFound,
    ServiceUnavailable,
    SlotBroken,
    Status,
    TokenRejected,
    agent_outcome,
    outcome_for,
)
from common.procs import run_command, safe_env, tail_of
from common.sandbox import SandboxPolicy, SandboxUnavailable, sandbox_status
from workcopy import git

log = logging.getLogger(__name__)


def default_runner_id() -> str:
    return settings.AGENTRUNNER_RUNNER_ID or f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class RunSummary:
    task_id: str
    title: str
    attempt: int
    status: str
    failure_reason: str = ""
    message: str = ""
    branch: str = ""
    commit: str = ""
    fetch: str = ""
    files_changed: list[str] = field(default_factory=list)
    tests_passed: bool | None = None
    tests_tail: str = ""
    test_results: dict = field(default_factory=dict)  # counts and failing tests, when recognised
    tests_reused: bool = False  # the final check is the agent's own passing run on the same tree
    summary: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: str | None = None
    recorded_cost_usd: str | None = None  # a replay: what the recorded calls cost (nothing was spent)
    llm_calls: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    spooled: list[str] = field(default_factory=list)
    sandbox: str = ""  # set when commands ran without the sandbox: why
    api_url: str = ""
    admin_url: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunLog:
    """The run's own log: timestamped lines in a file (the `log` artifact), mirrored to logging."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self._started:8.3f}s] {message}"
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
        log.info(message)

    def close(self) -> None:
        self._fh.close()


class HeartbeatThread(threading.Thread):
    """Heartbeats the attempt once a second (its answer carries a cancel request) and renews the
    slot lease at a third of its length, while the task runs. The first beat goes out at once and
    records the attempt's slot (retried with each beat until one is delivered).

    With ports whose ``events()`` waits on the store (in-process: a database write; over HTTP an
    outbox takes them without waiting) it also writes the run's events, so the run does not wait
    on them: ``offer`` queues one, and the thread writes what is queued, in order and as one batch,
    as soon as it can. What the run records before the thread starts or after it stops is written
    by the run itself, after what was queued (``stop`` writes the queue before it lets go)."""

    def __init__(self, run: TaskRun, *, slot_id: int | None = None):
        super().__init__(daemon=True, name=f"heartbeat-{run.task.short_id}")
        self.run_ = run
        self.slot_id = slot_id
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards the queue and whether it is accepted
        self._queue: list[dict] = []
        self._accepting = False
        self._writes_events = bool(getattr(run.ports.registry, "events_block", False))

    def offer(self, event: dict) -> bool:
        """Queue ``event`` for the thread to write; False when the caller must write it itself."""
        with self._lock:
            if not self._accepting:
                return False
            self._queue.append(event)
        self._wake.set()
        return True

    def stop(self, timeout: float = 10) -> None:
        self.stop_event.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout=timeout)

    def run(self) -> None:
        run = self.run_
        lease_seconds = settings.AGENTRUNNER_LEASE_SECONDS
        # Often enough for both the lease and the attempt's own staleness limit.
        renew_every = max(1.0, min(lease_seconds, settings.AGENTRUNNER_ATTEMPT_STALE_SECONDS) / 3)
        last_renew = time.monotonic()
        next_beat = time.monotonic()
        with self._lock:
            self._accepting = self._writes_events
        try:
            while not self.stop_event.is_set():
                self._wake.clear()
                self._write_queued()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + 1.0
                    if not self._beat():
                        return
                    renew_due = time.monotonic() - last_renew >= renew_every
                    if renew_due and run.lease is not None and not run.releasing:
                        if not self._renew(lease_seconds):
                            return
                        last_renew = time.monotonic()
                self._wake.wait(max(0.0, next_beat - time.monotonic()))
        finally:
            # Whatever was queued is written before anything the run records from now on: the run
            # waits on the lock meanwhile, then finds the queue closed and writes for itself.
            with self._lock:
                self._accepting = False
                queued, self._queue = self._queue, []
                self._write(queued)
            run.ports.thread_done()

    def _write_queued(self) -> None:
        with self._lock:
            queued, self._queue = self._queue, []
        self._write(queued)

    def _write(self, events: list[dict]) -> None:
        if not events:
            return
        run = self.run_
        try:
            run.ports.registry.events(task=run.task, events=events)
        except Exception as exc:  # events that cannot be written must not end the run
            run.log(f"could not record events {', '.join(e['type'] for e in events)}: {type(exc).__name__}")

    def _beat(self) -> bool:
        """One heartbeat; False when the attempt is no longer ours (the run stops)."""
        run = self.run_
        answer = self._send(lambda: run.ports.registry.heartbeat(task=run.task, slot_id=self.slot_id))
        if answer is False:
            return False
        if answer is not None:
            if answer.cancel_requested:
                if not run.cancel.is_set():
                    run.log("cancel requested")
                run.cancel.set()
            self.slot_id = None  # recorded
        return True

    def _renew(self, lease_seconds: int) -> bool:
        """Renew the slot lease; False when it is no longer ours (the run stops)."""
        run = self.run_
        lease = run.lease
        done = self._send(
            lambda: run.ports.pool.renew(slot_id=lease.slot_id, token=lease.token, lease_seconds=lease_seconds)
        )
        return done is not False

    def _send(self, call):
        """``call()``'s answer; False when it says the run lost its attempt, lease or token (the run
        is stopped), None when it failed otherwise (logged; the next beat tries again)."""
        try:
            return call()
        except LeaseLost as exc:
            self._lost(exc)
            return False
        except Exception as exc:
            self.run_.log(f"heartbeat failed: {type(exc).__name__}: {exc}")
            return None

    def _lost(self, exc: LeaseLost) -> None:
        run = self.run_
        run.log(f"{'runner token refused' if isinstance(exc, TokenRejected) else 'lease lost'} ({exc}); stopping")
        run.lease_lost = True
        run.lost_because = exc
        run.cancel.set()


class TaskRun:
    def __init__(
        self,
        task: ClaimedTask,
        ports: Ports,
        runner_id: str,
        progress: Callable[[dict], None] | None,
        llm_overrides: dict | None = None,
    ):
        self.task = task
        self.llm_overrides = llm_overrides or {}
        self.ports = ports
        self.runner_id = runner_id
        self._progress = progress
        self.winding_down = False
        self.cancel = threading.Event()
        self.lease: SlotLease | None = None
        self.lease_lost = False
        self.lost_because: LeaseLost | None = None  # what the heartbeat was told
        self.releasing = False  # the slot is being given back: its lease is not renewed any more
        self.heartbeat: HeartbeatThread | None = None  # started once a slot is leased
        self.started = time.monotonic()
        self.deadline = self.started + task.timeout_seconds
        self.phases: dict[str, float] = {}
        self.workdir = run_folder(task.id, task.attempt_number)
        _fresh_private_folder(self.workdir)
        self.log = RunLog(self.workdir / "run.log")
        self.transcript_path = self.workdir / "transcript.jsonl"
        self.test_log: Path | None = None
        self.patch_path: Path | None = None
        self.summary = RunSummary(task_id=str(task.id), title=task.title, attempt=task.attempt_number, status="running")
        self.client: LLMClient | None = None
        self.base_commit = ""
        self.branch = f"agent/{task.short_id}"
        self.test_runs = 0
        self.test_seconds = 0.0
        self._feedback = ""
        # The agent's last run of the plain test command, when it passed: (content tree, log,
        # results). A final check on the same tree would only repeat it.
        self._passing_run: tuple[str, Path, testreport.TestReport | None] | None = None
        self._last_report: testreport.TestReport | None = None

    # --- helpers --------------------------------------------------------------------------------
    def progress(self, info: dict) -> None:
        """Live progress for whoever runs the task. While the task runs, what the reporter raises
        is the runner's failure (a closed pipe arrives as an interrupt and winds down like
        SIGTERM); once winding down, nothing it raises may stop the release and the finish."""
        if self._progress is None:
            return
        if not self.winding_down:
            self._progress(info)
            return
        try:
            self._progress(info)
        except BaseException as exc:
            self.log(f"progress reporter failed while winding down: {type(exc).__name__}")

    def event(self, kind: str, message: str = "", data: dict | None = None) -> None:
        record = {"type": kind, "message": message, "data": data or {}}
        if self.heartbeat is not None and self.heartbeat.offer(record):
            return  # written by the heartbeat thread, in order
        try:
            self.ports.registry.events(task=self.task, events=[record])
        except Exception as exc:  # an event that cannot be written must not end the run
            self.log(f"could not record event {kind}: {type(exc).__name__}")

    def phase(self, name: str):
        run = self

        class _Phase:
            def __enter__(self_inner):
                self_inner.started = time.monotonic()
                run.log(f"phase {name}")
                run.progress({"phase": name, "elapsed": time.monotonic() - run.started})
                return self_inner

            def __exit__(self_inner, *exc):
                run.phases[name] = run.phases.get(name, 0.0) + time.monotonic() - self_inner.started
                return False

        return _Phase()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # --- steps ----------------------------------------------------------------------------------
    def run_tests(self, extra_args: list[str], *, final: bool) -> tuple[int | None, str]:
        """The repository's test command in the slot, in the sandbox, with a timeout.

        Returns the exit code (None when timed out or cancelled) and what the agent reads: the
        failing tests' messages first when the results are recognised, then the output's tail.
        A final check on the very tree the agent's last plain run passed on is that run."""
        assert self.lease is not None
        if final:
            reused = self._reuse_passing_run()
            if reused is not None:
                return reused
        self.test_runs += 1
        output = self.workdir / f"tests-{self.test_runs}.log"
        # Where a test runner may write JUnit XML (pytest --junitxml="$AGENTRUNNER_JUNIT_XML", jest-junit,
        # gotestsum, Maven): a folder of ours, writable inside the sandbox, outside the working copy.
        reports = self.workdir / "reports"
        reports.mkdir(exist_ok=True)
        junit = reports / f"junit-{self.test_runs}.xml"
        command = self.task.test_command
        if extra_args:
            import shlex

            command = f"{command} {' '.join(shlex.quote(a) for a in extra_args)}"
        timeout = max(1.0, min(self.remaining(), settings.AGENTRUNNER_TEST_TIMEOUT))
        env = safe_env({
            "PYTHONDONTWRITEBYTECODE": "1", "CI": "true", "AGENT_RUNNER": "1", "AGENTRUNNER_JUNIT_XML": str(junit),
        })  # fmt: skip
        result = run_command(
            command, cwd=self.lease.path, timeout=timeout, output_path=output, env=env, should_stop=self.cancel.is_set,
            policy=SandboxPolicy(
                writable=self.lease.path, network=self.task.test_network, extra_writable=(reports,),
                readonly=tuple(self.task.keep_paths),
            ),
        )  # fmt: skip
        self.test_seconds += result.duration
        report = testreport.parse(junit_path=junit, output=tail_of(output, 256 * 1024))
        self._last_report = report
        if final:
            self.test_log = output
        status = "cancelled" if result.cancelled else "timed out" if result.timed_out else f"exit {result.exit_code}"
        counts = f" ({report.headline()})" if report else ""
        self.log(f"tests ({command}): {status}{counts} in {result.duration:.2f}s")
        self.event(
            "tests",
            f"{'final ' if final else ''}test run: {status}{counts}",
            {
                "exit_code": result.exit_code,
                "timed_out": result.timed_out,
                "duration": round(result.duration, 3),
                "final": final,
                **({"results": _results_brief(report)} if report else {}),
            },
        )
        code = None if (result.timed_out or result.cancelled) else result.exit_code
        if not final and not extra_args and code == 0:
            self._passing_run = (git.content_tree(self.lease.path, self.task.keep_paths), output, report)
        elif not extra_args:
            self._passing_run = None
        if report is not None and report.failures:
            return code, f"{report.feedback(4000)}\n\nThe end of the output:\n{result.tail[-3000:]}"
        return code, result.tail

    def _reuse_passing_run(self) -> tuple[int, str] | None:
        """The agent's last plain run as the final check, when it passed on this same content and
        the repository does not ask for a fresh run; None otherwise."""
        if self._passing_run is None or self.task.rerun_final_tests:
            return None
        tree, output, report = self._passing_run
        if git.content_tree(self.lease.path, self.task.keep_paths) != tree:
            return None  # changed since: run again
        self.test_log = output
        self._last_report = report
        self.summary.tests_reused = True
        message = "final test run: the agent's last run passed on this same tree; not run again"
        self.log(message)
        self.event(
            "tests",
            message,
            {"exit_code": 0, "final": True, "reused": True, **({"results": _results_brief(report)} if report else {})},
        )
        return 0, tail_of(output, 4000)

    def on_agent_event(self, kind: str, message: str, data: dict) -> None:
        self.event(kind, message, data)
        if kind == "llm_retry" and self.client is not None:
            config = self.client.config
            what = "unreachable" if data.get("kind") in ("connection", "timeout") else f"failing ({data.get('kind')})"
            self.progress({
                "phase": "agent", "elapsed": time.monotonic() - self.started,
                "note": f"LLM {what} at {config.endpoint}; retry {data.get('attempt')}/{config.max_retries} "
                f"in {data.get('wait', 0):.0f} s",
            })  # fmt: skip
        if kind == "llm_call" and self.client is not None:
            totals = self.client.totals
            self.progress({
                "phase": "agent", "step": data.get("step"), "tokens": totals.total_tokens,
                "cost": None if totals.cost_unknown else float(totals.cost), "elapsed": time.monotonic() - self.started,
            })  # fmt: skip

    def agent_phase(self) -> tuple[Outcome | None, str]:
        task = self.task
        config = task_llm_config(task, self.llm_overrides)
        self.client = LLMClient(config, transcript=Transcript(self.transcript_path, secret=config.api_key))
        agent = Agent(
            client=self.client,
            workspace=Workspace(self.lease.path, protected=tuple(task.keep_paths)),
            run_tests=lambda args: self.run_tests(args, final=False),
            model=task.llm_model or None,
            on_event=self.on_agent_event,
            should_cancel=self.cancel.is_set,
        )
        budget = Budget(
            max_steps=task.max_steps or settings.AGENTRUNNER_DEFAULT_MAX_STEPS,
            max_tokens=task.max_tokens,
            max_cost=task.max_cost_usd,
            deadline=self.deadline,
        )
        summary = ""
        for iteration in range(1, task.max_iterations + 1):
            with self.phase("agent"):
                result = (
                    agent.start(task.instructions, budget) if iteration == 1 else agent.resume(self._feedback, budget)
                )
            self.log(f"agent round {iteration}: {result.outcome} ({result.message})")
            if not result.ok:
                return self._agent_failure(result), summary
            summary = result.summary
            if not git.has_changes(self.lease.path, task.keep_paths):
                return Outcome(
                    Status.FAILED, Reason.IMPLEMENTATION_FAILED, "the agent finished without changing anything"
                ), summary
            with self.phase("tests"):
                code, tail = self.run_tests([], final=True)
            self.summary.tests_tail = tail[-2000:]
            self.summary.test_results = self._last_report.as_dict() if self._last_report else {}
            if self.cancel.is_set():
                return self._cancelled(), summary
            if code == 0:
                self.summary.tests_passed = True
                return None, summary
            self.summary.tests_passed = False
            if code is None and self.remaining() <= 0:
                return Outcome(Status.FAILED, Reason.TIMEOUT, "the task's time ran out while the tests ran"), summary
            if iteration < task.max_iterations:
                self._feedback = (
                    f"The test command `{task.test_command}` failed ({'timed out' if code is None else f'exit code {code}'}). "
                    f"{'Its results' if self._last_report and self._last_report.failures else 'The end of its output'}:"
                    f"\n\n{tail[-7000:]}\n\nFix the code so the tests pass, then call finish."
                )
                self.event("iteration", f"tests failed; agent round {iteration + 1} of {task.max_iterations}")
        return Outcome(
            Status.FAILED, Reason.TESTS_FAILED, f"the tests still fail after {task.max_iterations} round(s)"
        ), summary

    def _cancelled(self) -> Outcome:
        if self.lease_lost:
            if isinstance(self.lost_because, TokenRejected):  # revoked: say so, not "lease lost"
                return outcome_for(self.lost_because)
            return outcome_for(LeaseLost("the slot lease was lost (the runner stalled)"))
        return agent_outcome("cancelled", "cancelled by request")

    def _agent_failure(self, result) -> Outcome:
        if result.outcome == "cancelled":
            return self._cancelled()
        kind = result.llm_error.kind if result.llm_error else ""
        return agent_outcome(result.outcome, result.message, llm_error_kind=kind)

    def commit_and_push(self, summary: str) -> None:
        task = self.task
        with self.phase("commit"):
            message = f"{task.title}\n\n{summary.strip() or 'Changes made by Agent Runner.'}\n\nAgent-Runner-Task: {task.id}\n"
            commit = git.commit_all(
                self.lease.path, message, author_name=settings.AGENTRUNNER_GIT_AUTHOR_NAME,
                author_email=settings.AGENTRUNNER_GIT_AUTHOR_EMAIL, keep_paths=task.keep_paths,
            )  # fmt: skip
            self.summary.commit = commit
            self.summary.branch = self.branch
            # The result leaves the host (a push, or a bundle sent to the server) while the list of
            # files and the patch are made: the three only read the copy.
            patch = self.workdir / f"{task.short_id}.patch"
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish") as background:
                publishing = background.submit(
                    self.ports.pool.publish, task=task, path=self.lease.path, branch=self.branch, base=self.base_commit
                )
                try:
                    self.summary.files_changed = git.changed_files(self.lease.path, self.base_commit)
                    git.format_patch(self.lease.path, self.base_commit, patch)
                finally:
                    try:
                        self.summary.fetch = publishing.result()
                    except BaseException:
                        patch.unlink(missing_ok=True)  # as before: no patch of a result that did not leave
                        raise
            self.patch_path = patch
            self.event(
                "committed",
                f"{commit[:12]} pushed to {self.branch}",
                {"commit": commit, "branch": self.branch, "files": self.summary.files_changed},
            )

    def store_artifacts(self) -> bool:
        """Store and link every artifact of this attempt; spool what fails. True when all stored."""
        files = [
            (self.patch_path, "patch", f"{self.task.short_id}.patch", "text/x-diff"),
            (self.test_log, "test_report", f"tests-attempt{self.task.attempt_number}.log", "text/plain"),
            (
                self.transcript_path,
                "transcript",
                f"transcript-attempt{self.task.attempt_number}.jsonl",
                "application/x-ndjson",
            ),
            (self.log.path, "log", f"run-attempt{self.task.attempt_number}.log", "text/plain"),
        ]
        ok = True
        files = [f for f in files if f[0] is not None and f[0].exists()]
        with self.phase("artifacts"):
            if any(kind == "log" for _, kind, _, _ in files):
                self.log("storing artifacts")

            def store(path: Path, kind: str, name: str, content_type: str) -> uuid.UUID:
                return self.ports.artifacts.store(
                    task=self.task,
                    path=path,
                    name=name,
                    kind=kind,
                    content_type=content_type,
                    metadata={"task": str(self.task.id), "attempt": self.task.attempt_number},
                    role=kind,  # stored and linked in one step (one HTTP call)
                )

            # Over HTTP the uploads go out side by side (each is a round trip, mostly waiting);
            # in-process one after the other on the run's own database connection.
            parallel = getattr(self.ports.artifacts, "parallel_uploads", 1)
            if parallel > 1 and len(files) > 1:
                with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="upload") as pool:
                    futures = [pool.submit(store, *f) for f in files]
                    outcomes = []
                    for future in futures:
                        try:
                            outcomes.append(future.result())
                        except Exception as exc:
                            outcomes.append(exc)
            else:
                outcomes = []
                for f in files:
                    try:
                        outcomes.append(store(*f))
                    except Exception as exc:
                        outcomes.append(exc)
            for (path, kind, name, content_type), outcome in zip(files, outcomes, strict=True):
                if not isinstance(outcome, Exception):
                    self.summary.artifacts[kind] = str(outcome)
                    continue
                ok = False
                exc = outcome
                spooled = spool_artifact(self.task.id, self.task.attempt_number, path, name, kind, content_type)
                self.summary.spooled.append(kind)
                self.log(f"could not store {kind} ({type(exc).__name__}: {exc}); kept in the spool at {spooled}")
                self.event(
                    "artifact_spooled",
                    f"{kind} could not be stored; kept at {spooled} for a later upload",
                    {"kind": kind, "path": str(spooled)},
                )
        return ok


# --- run folders -----------------------------------------------------------------------------------
def run_folder(task_id: uuid.UUID, attempt: int) -> Path:
    """An attempt's working folder on this host: its run log, transcript, test logs, patch."""
    return Path(settings.TMP_ROOT) / f"run-{task_id.hex}-{attempt}"


def _fresh_private_folder(path: Path) -> None:
    """Create ``path`` empty and private: whatever held the name (a stale folder, a planted link) goes
    first, so no file of this run is opened through something it did not create."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    path.mkdir(mode=0o700)


def _copy_nofollow(source: Path, target: Path) -> None:
    """Copy a regular file without following a symbolic link at ``source`` (it raises instead)."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise OSError(f"{source.name} is not a regular file")
        with open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)


# Files of a run folder worth keeping, by name: (role, artifact name, content type).
_RECOVERABLE = {
    "transcript.jsonl": ("transcript", "transcript-attempt{n}.jsonl", "application/x-ndjson"),
    "run.log": ("log", "run-attempt{n}.log", "text/plain"),
}
_TEST_LOG = re.compile(r"^tests-([0-9]{1,6})\.log\Z")


def adopt_run_folders(ports: Ports, task: ClaimedTask) -> list[int]:
    """Pick up what runners killed mid-task (SIGKILL, power loss) left on this host for this task's
    earlier attempts: each ``run-<task>-<n>`` folder's transcript, run log and test logs go to the
    spool as artifacts of attempt ``n`` (metadata ``recovered: true``; ``flush_spool`` uploads them),
    an event says so, and the folder is removed. Symbolic links and other odd entries are skipped,
    never followed. Returns the attempt numbers adopted; a folder that cannot be spooled stays."""
    root = Path(settings.TMP_ROOT)
    prefix = f"run-{task.id.hex}-"
    adopted: list[int] = []
    if not root.is_dir():
        return adopted
    for folder in sorted(root.iterdir()):
        number_text = folder.name.removeprefix(prefix)
        if number_text == folder.name or not (number_text.isascii() and number_text.isdigit()):
            continue
        number = int(number_text)
        if number >= task.attempt_number or folder.is_symlink() or not folder.is_dir():
            continue
        kept, skipped = [], []
        try:
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.name in _RECOVERABLE:
                    kind, name, content_type = _RECOVERABLE[entry.name]
                    name, label = name.format(n=number), f"recovered-{kind}"
                elif match := _TEST_LOG.match(entry.name):
                    kind, content_type = "test_report", "text/plain"
                    name, label = f"tests-attempt{number}-run{match[1]}.log", f"recovered-tests-{match[1]}"
                else:
                    continue
                if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_size > (
                    settings.ARTIFACTS_MAX_SIZE
                ):
                    skipped.append(entry.name)
                    continue
                spool_artifact(
                    task.id, number, Path(entry.path), name, kind, content_type,
                    label=label, metadata={"recovered": True},
                )  # fmt: skip
                kept.append(entry.name)
        except OSError as exc:
            log.warning("run folder %s could not be adopted: %s", folder.name, exc)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        adopted.append(number)
        data = {"attempt": number, "files": kept}
        if skipped:
            data["skipped"] = skipped
        try:
            ports.registry.events(
                task=task,
                events=[{
                    "type": "run_recovered",
                    "message": f"attempt {number} left its run folder behind (its runner was killed); "
                    f"{', '.join(kept) or 'nothing'} kept as artifacts of attempt {number}",
                    "data": data,
                }],
            )  # fmt: skip
        except Exception as exc:
            log.warning("could not record the recovery of attempt %s: %s", number, type(exc).__name__)
    return adopted


# --- the spool -------------------------------------------------------------------------------------
def spool_artifact(
    task_id: uuid.UUID,
    attempt: int,
    path: Path,
    name: str,
    kind: str,
    content_type: str,
    *,
    label: str = "",
    metadata: dict | None = None,
) -> Path:
    """Keep a copy of an artifact for a later upload (``flush_spool``); ``label`` names the entry
    when one attempt spools several of a kind, ``metadata`` is added to the artifact's."""
    folder = Path(settings.SPOOL_ROOT) / task_id.hex / f"{attempt}-{label or kind}"
    folder.mkdir(parents=True, exist_ok=True)
    _copy_nofollow(path, folder / "content")
    manifest = {"task": str(task_id), "attempt": attempt, "name": name, "kind": kind, "content_type": content_type}
    if metadata:
        manifest["metadata"] = metadata
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def flush_spool(ports: Ports, task: ClaimedTask) -> list[str]:
    """Upload what earlier attempts of ``task`` spooled on this host; each entry is removed once
    stored and linked (to the attempt that spooled it: its metadata names it)."""
    task_folder = Path(settings.SPOOL_ROOT) / task.id.hex
    uploaded: list[str] = []
    if not task_folder.is_dir():
        return uploaded
    for entry in sorted(task_folder.iterdir()):
        manifest_path = entry / "manifest.json"
        if not manifest_path.exists():
            continue
        manifest = json.loads(manifest_path.read_text())
        try:
            artifact_id = ports.artifacts.store(
                task=task,
                path=entry / "content",
                name=manifest["name"],
                kind=manifest["kind"],
                content_type=manifest["content_type"],
                metadata={
                    **(manifest.get("metadata") or {}),
                    "task": manifest["task"],
                    "attempt": manifest["attempt"],
                    "spooled": True,
                },
                role=manifest["kind"],  # linked to the attempt that spooled it (metadata "attempt")
            )
            ports.registry.events(
                task=task,
                events=[{
                    "type": "artifact_unspooled",
                    "message": f"spooled {manifest['kind']} of attempt {manifest['attempt']} stored",
                    "data": {"artifact": str(artifact_id)},
                }],
            )  # fmt: skip
        except Exception as exc:
            log.warning("spooled artifact %s still cannot be stored: %s", entry, type(exc).__name__)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        uploaded.append(str(artifact_id))
    if not any(task_folder.iterdir()):
        task_folder.rmdir()
    return uploaded


# --- entry point -----------------------------------------------------------------------------------
def task_llm_config(task: ClaimedTask, llm_overrides: dict | None = None) -> LLMConfig:
    """The model configuration a task runs with: the task's own provider (e.g. the demo's replay)
    holds whoever runs it; then the caller's. Only the keys a task may carry: a stored base URL
    must never redirect the runner's key."""
    stored = {k: v for k, v in task.llm_config.items() if k in TASK_CONFIG_KEYS}
    return from_settings(**{"model": task.llm_model or None, **stored, **(llm_overrides or {})})


def run_task(
    *,
    task_id: uuid.UUID | str | None = None,
    runner_id: str | None = None,
    ports: Ports | None = None,
    progress: Callable[[dict], None] | None = None,
    llm_overrides: dict | None = None,
    claim_wait: float = 0,
) -> RunSummary | None:
    """Claim a task (the one named, or the next runnable) and run it to a final state.

    Returns None when nothing was runnable (within ``claim_wait`` seconds, a long poll where the
    registry supports it). Raises SandboxUnavailable, before claiming anything,
    when repository commands may not run on this host (see common.sandbox), and LLMNotConfigured
    when the claimed task needs a model this host has no configuration for (the task is given back
    first, its attempt failed with that reason)."""
    sandbox = sandbox_status()
    if sandbox["mode"] == "unavailable":
        raise SandboxUnavailable(sandbox["reason"])
    ports = ports or Ports.from_settings()
    runner_id = runner_id or default_runner_id()
    claim_started = time.monotonic()
    # With no live model here, only a task that brings its own (a replayed transcript) is taken
    # from the queue: one that needs a model stays queued for other runners, its attempts intact.
    replay_only = lacks_live_model(from_settings(**(llm_overrides or {})))
    task = ports.registry.claim(runner_id=runner_id, task_id=task_id, wait=claim_wait, replay_only=replay_only)
    if task is None:
        return None
    # Known only now: whether the task needs a live model (a replayed one needs none).
    if problem := config_problem(task_llm_config(task, llm_overrides)):
        _give_back(ports, task, f"the runner {runner_id} cannot call a model: {problem}")
        raise LLMNotConfigured(
            f"task {task.id} needs a model this runner cannot call, so it was given back to the queue: {problem}"
        )
    try:
        run = TaskRun(task, ports, runner_id, progress, llm_overrides)
    except Exception as exc:  # this host cannot run anything (no run folder): give the task back first
        _give_back(ports, task, f"the runner could not start the attempt: {exc.__class__.__name__}: {exc}")
        raise
    run.phases["claim"] = time.monotonic() - claim_started
    run.log(f"claimed task {task.id} ({task.title}) attempt {task.attempt_number} as {runner_id}")
    outcome: Outcome | None = None
    summary_text = ""
    interrupted = False
    try:
        try:
            if adopted := adopt_run_folders(ports, task):
                run.log(f"adopted the run folder(s) of killed attempt(s) {', '.join(map(str, adopted))}")
        except Exception as exc:  # leftovers of an earlier attempt must not stop this one
            run.log(f"could not adopt earlier run folders: {type(exc).__name__}: {exc}")
        if flush_spool(ports, task):
            run.log("uploaded artifacts spooled by an earlier attempt")
        with run.phase("allocate"):
            outcome = _allocate(run)
        if outcome is None:
            # Its first beat records the slot on the attempt; from now on it writes the events.
            run.heartbeat = HeartbeatThread(run, slot_id=run.lease.slot_id)
            run.heartbeat.start()
            _leased_event(run)
            with run.phase("prepare"):
                outcome = _prepare(run)
        if outcome is None:
            outcome, summary_text = run.agent_phase()
            run.summary.summary = summary_text
            if outcome is None or outcome.reason == "tests_failed":
                run.commit_and_push(summary_text)
    except GitError as exc:
        outcome = outcome_for(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: wind down cleanly, then stop
        run.log("interrupted")
        interrupted = True
        outcome = outcome_for(exc, "the runner was interrupted")
    except Exception as exc:  # the runner's own failure: recorded, slot still released below
        run.log("runner error:\n" + traceback.format_exc())
        outcome = outcome_for(exc)
    if outcome is None:
        outcome = Outcome(Status.SUCCEEDED)
    run.winding_down = True
    # The slot's copy is reset from here on, while the heartbeat stops, the usage is recorded and
    # the artifacts are stored: none of them touches the copy (the artifacts live in the run folder),
    # and all of them mostly wait (git, the database, the disk, the store).
    release_done = _release_start(run)
    try:
        if run.heartbeat is not None:
            run.heartbeat.stop()
        _record_usage(run)
        run.log(f"outcome: {outcome.status} {outcome.reason} {outcome.message}".rstrip())
        if run.client is not None:
            run.client.transcript.close()
        stored = run.store_artifacts()
    finally:
        _release_wait(run, release_done)
    if not stored and outcome.status == Status.SUCCEEDED:
        outcome = Outcome(
            Status.FAILED,
            Reason.INFRASTRUCTURE_ERROR,
            "artifacts could not be stored (kept in the spool for the next attempt)",
            retry=True,
        )
    outcome_message = outcome.message
    if run.summary.spooled and "spool" not in outcome_message:
        outcome_message = f"{outcome_message} (artifacts spooled: {', '.join(run.summary.spooled)})".strip()
    metrics = _metrics(run)
    try:
        with run.phase("finish"):
            _flush(run)
            final = ports.registry.finish(
                task=task, status=outcome.status, failure_reason=outcome.reason,
                message=outcome_message, retry=outcome.retry,
                result={
                    "result_branch": run.summary.branch, "result_commit": run.summary.commit, "result_fetch": run.summary.fetch,
                    "tests_passed": run.summary.tests_passed, "test_results": run.summary.test_results, "summary": summary_text,
                },
                metrics=metrics,
            )  # fmt: skip
    except LeaseLost as exc:
        run.log(f"result discarded: {exc}")
        final = "lost"
        if isinstance(exc, TokenRejected) and "runner token" not in outcome_message:
            outcome_message = f"result discarded: {exc.message}"
    except ServiceUnavailable as exc:  # the server stayed away past every retry: its reaper takes the attempt back
        run.log(f"result not delivered: {exc}")
        final = "lost"
    run.summary.status = final
    run.summary.failure_reason = outcome.reason if final != "succeeded" else ""
    run.summary.message = outcome_message
    run.summary.timings = {k: round(v, 4) for k, v in run.phases.items()} | {
        "total": round(time.monotonic() - run.started, 4)
    }
    base = settings.AGENTRUNNER_PUBLIC_URL.rstrip("/")
    run.summary.api_url = f"{base}/api/tasks/{task.id}/"
    run.summary.admin_url = f"{base}/admin/registry/task/{task.id}/change/"
    run.log.close()
    shutil.rmtree(run.workdir, ignore_errors=True)
    if interrupted:
        raise KeyboardInterrupt
    return run.summary


def _record_usage(run: TaskRun) -> None:
    """The LLM usage into the summary and onto the task."""
    if run.client is None:
        return
    totals = run.client.totals
    run.summary.prompt_tokens, run.summary.completion_tokens = totals.prompt_tokens, totals.completion_tokens
    run.summary.cost_usd = None if totals.cost_unknown else str(totals.cost)
    if totals.recorded_cost is not None:
        run.summary.recorded_cost_usd = str(totals.recorded_cost)
    run.summary.llm_calls = totals.calls
    try:
        run.ports.registry.add_usage(
            task=run.task,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            cost_usd=None if totals.cost_unknown else totals.cost,
        )
    except Exception:
        run.log("could not record usage:\n" + traceback.format_exc())


def _give_back(ports: Ports, task: ClaimedTask, message: str) -> None:
    """End a claimed attempt that never started as the runner's failure, so the task runs again."""
    try:
        ports.registry.finish(
            task=task, status="failed", failure_reason="infrastructure_error", message=message, retry=True,
            result={}, metrics={},
        )  # fmt: skip
    except Exception as exc:  # the reaper ends it then
        log.warning("could not give task %s back: %s", task.id, exc.__class__.__name__)


def _flush(run: TaskRun) -> None:
    """Deliver buffered events and usage before the attempt ends (a no-op in-process)."""
    try:
        run.ports.registry.flush()
    except Exception as exc:
        run.log(f"could not deliver buffered events: {type(exc).__name__}: {exc}")


def _allocate(run: TaskRun) -> Outcome | None:
    task = run.task
    refused = _check_sandbox(run)
    if refused is not None:
        return refused
    try:
        run.lease = run.ports.pool.allocate(
            task=task, holder=f"{run.runner_id} task {task.short_id}",
            lease_seconds=settings.AGENTRUNNER_LEASE_SECONDS, wait_seconds=settings.AGENTRUNNER_SLOT_WAIT_SECONDS,
            ref=task.base_ref,
        )  # fmt: skip
    except (RefNotFound, NoSlotAvailable, SlotBroken) as exc:
        return outcome_for(exc)
    except GitError as exc:  # not the ref: the working copy failed, another slot may serve
        return outcome_for(SlotBroken(exc.message))
    run.base_commit = run.lease.commit
    return None


def _leased_event(run: TaskRun) -> None:
    run.event(
        "slot_leased",
        f"slot {run.lease.slot_id} at {run.lease.commit[:12]}",
        {"slot": run.lease.slot_id, "commit": run.lease.commit, "path": str(run.lease.path)},
    )


def _check_sandbox(run: TaskRun) -> Outcome | None:
    """Before any command runs: say so on the task when they run without a sandbox (refused
    earlier, before the claim, when none may run them; refused here if that changed since)."""
    status = sandbox_status()
    if status["mode"] == "unavailable":
        run.event("sandbox", f"commands refused: {status['reason']}", status)
        return outcome_for(SandboxUnavailable(status["reason"]), status["reason"])
    if status["mode"] == "none":
        run.summary.sandbox = f"commands ran WITHOUT a sandbox: {status['reason']}"
        run.log(run.summary.sandbox)
        run.event("sandbox", run.summary.sandbox, status)
    return None


def _prepare(run: TaskRun) -> Outcome | None:
    git.create_branch(run.lease.path, run.branch)
    run.event(
        "prepared", f"branch {run.branch} from {run.base_commit[:12]}", {"branch": run.branch, "base": run.base_commit}
    )
    return None


def _release_start(run: TaskRun) -> Callable[[], None] | None:
    """Start giving the slot back (its reset runs in the background where the pool port can); the
    result is for ``_release_wait``. The phase "release" counts this and the wait, not what runs
    in between."""
    if run.lease is None:
        return None
    run.releasing = True
    with run.phase("release"):
        try:
            start = getattr(run.ports.pool, "release_start", None)
            if start is not None:
                return start(slot_id=run.lease.slot_id, token=run.lease.token)
            run.ports.pool.release(slot_id=run.lease.slot_id, token=run.lease.token)
        except Exception as exc:  # stale token: the reaper or another holder owns it now
            run.log(f"slot release refused: {type(exc).__name__}: {exc}")
    return None


def _release_wait(run: TaskRun, done: Callable[[], None] | None) -> None:
    if done is None:
        return
    started = time.monotonic()
    try:
        done()
    except Exception as exc:
        run.log(f"slot release refused: {type(exc).__name__}: {exc}")
    finally:
        run.phases["release"] = run.phases.get("release", 0.0) + time.monotonic() - started


def _metrics(run: TaskRun) -> dict[str, Any]:
    totals = run.client.totals.as_dict() if run.client else {}
    return {
        "phases": {k: round(v, 4) for k, v in run.phases.items()},
        "total_seconds": round(time.monotonic() - run.started, 4),
        "llm": totals,
        "ports": {k: round(v, 4) for k, v in run.ports.timed.seconds.items()},
        "test_runs": run.test_runs,
        "test_seconds": round(run.test_seconds, 4),
        "slot": run.lease.slot_id if run.lease else None,
        "cost_usd": totals.get("cost_usd"),
    }


def _results_brief(report: testreport.TestReport) -> dict[str, Any]:
    """Counts and the first failing test ids, small enough for an event."""
    return {
        "source": report.source, "passed": report.passed, "failed": report.failed, "errored": report.errored,
        "skipped": report.skipped, "failing": [f.test for f in report.failures[:20]],
    }  # fmt: skip
