from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import InterfaceError, OperationalError, connection  # exceptions and a handle: no query

from agentrunner.llm.config import LLMNotConfigured
from agentrunner.runner.summary import Progress, format_summary, quiet_logs, silence_output
from common.errors import DomainError
from common.outcomes import ServiceUnavailable
from common.sandbox import sandbox_status
from common.schema import require_schema

CONFIG_ERROR_EXIT = 2  # the command cannot work as configured: nothing was created or claimed
WORKER_DIED_EXIT = 4  # --loop: a worker died of an error of this host; the loop stopped
# What a server gone away raises (the database restarting or failing over, the API unreachable):
# --loop waits it out. ServiceUnavailable is what the ports raise for either.
UNAVAILABLE_ERRORS = (OperationalError, InterfaceError, ServiceUnavailable)

log = logging.getLogger(__name__)


class _Backoff:
    """Waits between retries while the database is away: 0.5 s doubling to 10 s."""

    def __init__(self, first: float = 0.5, most: float = 10.0):
        self.first, self.most, self.wait = first, most, first

    def next(self) -> float:
        wait, self.wait = self.wait, min(self.wait * 2, self.most)
        return wait

    def reset(self) -> None:
        self.wait = self.first


class _Outage:
    """The loop's view of the database, shared by its workers: an outage is said once when it
    begins and once when it ends, not on every retry."""

    def __init__(self, say):
        self.say = say
        self.lock = threading.Lock()
        self.since: float | None = None

    def began(self, exc: BaseException) -> None:
        with self.lock:
            if self.since is None:
                self.since = time.monotonic()
                # Ours say what is away; of a driver's, the class name only (its message can name
                # the database's host and user).
                what = (
                    exc.message
                    if isinstance(exc, ServiceUnavailable)
                    else f"database unavailable ({type(exc).__name__})"
                )
                self.say(f"{what}; waiting for it, retrying with backoff")

    def ended(self) -> None:
        if self.since is None:
            return
        with self.lock:
            if self.since is not None:
                self.say(f"reachable again after {time.monotonic() - self.since:.0f} s")
                self.since = None


def _drop_connection(*, always: bool = False) -> None:
    """Close this thread's connection when it is broken (or ``always``), so the next query
    reconnects: outside a request nothing else closes a connection the server dropped."""
    try:
        if always or (connection.connection is not None and not connection.is_usable()):
            connection.close()
    except Exception:  # closing a dead connection may fail too; it is gone either way
        connection.connection = None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _money(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise CommandError(f"--max-cost: {value!r} is not a number") from None
    if amount < 0:
        raise CommandError("--max-cost must not be negative")
    return amount


class Command(BaseCommand):
    help = "Run agent tasks: one by id, the next runnable (--next), continuously (--loop), or a new one (--repo)."

    def add_arguments(self, parser):
        parser.add_argument("task_id", nargs="?", help="Run this task now, in the foreground.")
        parser.add_argument("--next", action="store_true", help="Claim and run the next runnable task.")
        parser.add_argument(
            "--loop",
            action="store_true",
            help="Keep claiming and running tasks; waits out a database outage; exits 4 when a worker dies.",
        )
        parser.add_argument(
            "--concurrency", type=int, default=1, help="With --loop: tasks at once, each in its own slot."
        )
        parser.add_argument("--until-idle", action="store_true", help="With --loop: stop when nothing is runnable.")
        parser.add_argument("--repo", help="Path or URL of a repository: register it if needed and create a task.")
        parser.add_argument("--instructions", help="With --repo: what the agent should do.")
        parser.add_argument(
            "--title", default="", help="With --repo: the task's title (default: the instructions' first line)."
        )
        parser.add_argument("--test-command", default="", help="With --repo: the command that runs the tests.")
        parser.add_argument(
            "--base-ref",
            default="",
            help="With --repo: branch, tag or commit to start from (default: the default branch).",
        )
        parser.add_argument("--model", default="", help="LLM model for this task.")
        parser.add_argument(
            "--max-steps", type=int, help="LLM calls per agent round (default: AGENTRUNNER_DEFAULT_MAX_STEPS)."
        )
        parser.add_argument("--max-tokens", type=int, help="Total LLM tokens (prompt + completion) the task may use.")
        parser.add_argument("--max-cost", type=_money, help="Most the task may spend on the LLM, in USD.")
        parser.add_argument("--timeout", type=int, default=1800, help="Task wall clock in seconds.")
        parser.add_argument(
            "--max-iterations",
            type=int,
            default=3,
            help="Agent rounds: when the tests fail, their output goes back to the agent (default 3).",
        )
        parser.add_argument(
            "--enqueue",
            action="store_true",
            help="Hand the task to a Celery worker instead of running it here (needs CELERY_BROKER_URL).",
        )
        parser.add_argument(
            "--server",
            default="",
            help="Run as a remote runner against this server's runner API (with AGENTRUNNER_RUNNER_TOKEN); "
            "the same as setting AGENTRUNNER_API_URL. A remote runner needs no database.",
        )
        parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")
        parser.add_argument("--quiet", action="store_true", help="No live progress.")

    def handle(self, *args, **opts):
        try:
            self._handle(**opts)
        except BrokenPipeError:  # the summary's reader went away: nothing more to say
            silence_output()
            sys.exit(130)

    def _handle(self, **opts):
        self.opts = opts
        self.progress_out = Progress(self.stderr)
        # SIGTERM (systemd, docker stop, kill) winds down like Ctrl-C: the slot is released and
        # the task goes back to the queue instead of waiting for the reaper.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        quiet_logs(opts.get("verbosity", 1))
        modes = sum(bool(x) for x in (opts["task_id"], opts["next"], opts["loop"], opts["repo"]))
        if modes != 1:
            raise CommandError("give exactly one of: a task id, --next, --loop, or --repo with --instructions")
        if opts["concurrency"] < 1:
            raise CommandError("--concurrency must be at least 1")
        for name in ("max_steps", "max_tokens", "timeout", "max_iterations"):
            if opts[name] is not None and opts[name] < 1:
                raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
        if opts["enqueue"] and not settings.CELERY_BROKER_URL:
            # Without a broker Celery would run the task eagerly right here and report it enqueued.
            raise CommandError(
                "--enqueue needs a broker: set CELERY_BROKER_URL (and run a worker), or drop --enqueue to run it here",
                returncode=CONFIG_ERROR_EXIT,
            )
        self.remote = self._remote_config()
        if self.remote is None:
            require_schema()
        elif opts["repo"]:
            raise CommandError(
                "--repo registers a repository and creates a task in the database; a remote runner has none: "
                "create the task through the API (POST /api/tasks/), then run it here by id or with --next",
                returncode=CONFIG_ERROR_EXIT,
            )
        if not opts["enqueue"]:  # a worker runs an enqueued task with its own configuration
            self._check_llm_config()
            sandbox = sandbox_status()  # refused before any task is created or claimed
            if sandbox["mode"] == "unavailable":
                raise CommandError(sandbox["reason"], returncode=CONFIG_ERROR_EXIT)
        if self.remote is not None and not opts["enqueue"]:
            self._announce()
        task_id = opts["task_id"]
        if opts["repo"]:
            task_id = self._create_task()
        if opts["enqueue"]:
            return self._enqueue(task_id)
        if opts["loop"]:
            failures = self._loop()
            if failures:
                sys.exit(1)
            return
        try:
            from agentrunner.runner.pipeline import run_task

            summary = run_task(task_id=task_id, progress=None if opts["quiet"] else self._progress)
        except LLMNotConfigured as exc:
            raise CommandError(exc.message, returncode=CONFIG_ERROR_EXIT) from None
        except DomainError as exc:
            raise CommandError(exc.message) from None
        except KeyboardInterrupt:
            if not self.progress_out.closed:
                self.stderr.write("interrupted: the slot was released and the task queued again")
            sys.exit(130)
        if summary is None:
            from agentrunner.llm.config import from_settings, lacks_live_model

            if lacks_live_model(from_settings()):
                self.stderr.write("nothing to run: no queued task that replays a transcript (no live model here)")
            else:
                self.stderr.write("nothing to run: no queued task")
            sys.exit(3)
        self._print_summary(summary)
        if summary.status != "succeeded":
            sys.exit(1)

    def _remote_config(self):
        """This host's API configuration when it runs remote (``--server`` or the settings), else
        None. In remote mode nothing below touches the database: no schema check, no model."""
        from agentrunner.runner.http import ApiConfig

        server = self.opts["server"]
        if server:
            if not settings.AGENTRUNNER_RUNNER_TOKEN:
                raise CommandError(
                    "--server needs a runner token: set AGENTRUNNER_RUNNER_TOKEN (made on the server with "
                    "`manage.py create_runner_token <name>`)",
                    returncode=CONFIG_ERROR_EXIT,
                )
            # The ports read the settings: this process now runs remote, whichever way it was asked.
            settings.AGENTRUNNER_API_URL = server
        config = ApiConfig.from_settings()
        if config is not None and "AGENTRUNNER_PUBLIC_URL" not in os.environ:
            # Links in the summary point at the server the task lives on.
            settings.AGENTRUNNER_PUBLIC_URL = config.registry_url.split("/api/runner/v1/")[0]
        return config

    def _announce(self) -> None:
        """Tell the server this host is here (name, capacity) before claiming anything."""
        from agentrunner.runner.http import announce_host
        from common.outcomes import LeaseLost, ServiceUnavailable

        try:
            announce_host(self.remote)
        except (ServiceUnavailable, LeaseLost, DomainError) as exc:
            raise CommandError(
                f"cannot register this runner host with {self.remote.registry_url}: {exc.message}",
                returncode=CONFIG_ERROR_EXIT,
            ) from None

    def _check_llm_config(self) -> None:
        """Fail at once, before anything is created or claimed, when no call could succeed.

        A task may bring its own provider (a replayed transcript, as the demo's): without a live
        model configured here, a runner still runs those. In-process the task to run (or the next
        one) is looked at before claiming; a remote runner says at start what it can run and
        claims only tasks that replay a transcript (a task that needs a model stays queued for
        other runners; a task named is given back and stops the runner,
        LLMNotConfigured). A configuration that is wrong in itself (an unknown provider, a missing
        transcript) is refused at once in both modes."""
        from agentrunner.llm.config import TASK_CONFIG_KEYS, config_problem, from_settings, lacks_live_model

        configured = from_settings()
        problem = config_problem(configured)
        if problem is None:
            return
        if not lacks_live_model(configured):
            raise CommandError(f"no usable LLM: {problem}", returncode=CONFIG_ERROR_EXIT)
        if self.remote is not None:
            self.stderr.write(
                f"no live model configured: {problem}. Only tasks that replay a recorded transcript run here; "
                "tasks that need a model stay queued for other runners"
            )
            return
        from registry.models import Task

        stored: dict = {}
        candidates = Task.objects.none()
        if self.opts["task_id"]:
            candidates = Task.objects.filter(pk=self.opts["task_id"])
        elif self.opts["next"] or self.opts["loop"]:
            candidates = Task.objects.filter(status="queued").order_by("-priority", "created_at")
        try:
            stored = (candidates.values_list("llm_config", flat=True).first()) or {}
        except (ValidationError, ValueError):
            pass  # not a task id: run_task says so
        problem = config_problem(from_settings(**{k: v for k, v in stored.items() if k in TASK_CONFIG_KEYS}))
        if problem:
            raise CommandError(f"no usable LLM: {problem}", returncode=CONFIG_ERROR_EXIT)

    # --- modes ----------------------------------------------------------------------------------
    def _create_task(self) -> str:
        from registry import services as registry
        from repopool import services as pool

        opts = self.opts
        if not opts["instructions"] or not opts["instructions"].strip():
            raise CommandError("--repo needs --instructions")
        try:
            repo = pool.repository_find_or_create_for_url(url=opts["repo"], test_command=opts["test_command"])
            task = registry.task_create(
                title=opts["title"] or opts["instructions"].strip().splitlines()[0][:200],
                instructions=opts["instructions"],
                repository=repo,
                base_ref=opts["base_ref"],
                test_command=opts["test_command"],
                llm_model=opts["model"],
                max_steps=opts["max_steps"],
                max_tokens=opts["max_tokens"],
                max_cost_usd=opts["max_cost"],
                timeout_seconds=opts["timeout"],
                max_iterations=opts["max_iterations"],
                # A replayed task stays replayed whoever runs it (the key never goes in here).
                llm_config=(
                    {"provider": "replay", "replay_file": settings.AGENTRUNNER_LLM_REPLAY_FILE}
                    if settings.AGENTRUNNER_LLM_PROVIDER == "replay"
                    else {}
                ),
            )
        except DomainError as exc:
            raise CommandError(exc.message) from None
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stderr.write(f"task {task.pk} created for repository {repo.name}")
        return str(task.pk)

    def _enqueue(self, task_id):
        from agentrunner.tasks import run_agent_task

        if not task_id:
            raise CommandError("--enqueue needs a task id or --repo")
        run_agent_task.delay(str(task_id))
        self.stdout.write(
            json.dumps({"task_id": str(task_id), "enqueued": True}) if self.opts["json"] else f"enqueued {task_id}"
        )

    def _loop(self) -> int:
        """Workers claim and run tasks until stopped. A database that goes away is waited out (each
        worker backs off; the outage is said once); a worker that dies of anything else stops the
        loop with WORKER_DIED_EXIT once the others have finished their tasks, never exit 0."""
        from agentrunner.runner.pipeline import run_task

        remote = self.remote is not None
        # Remote: each claim waits on the server (a long poll) for a task to become runnable.
        claim_wait = 0.0 if (not remote or self.opts["until_idle"]) else settings.AGENTRUNNER_CLAIM_WAIT_SECONDS
        failures = {"n": 0}
        lock = threading.Lock()
        stop = threading.Event()
        outage = _Outage(self.stderr.write)
        died: list[str] = []
        not_set_up: list[str] = []

        def worker(n: int) -> None:
            backoff = _Backoff()
            try:
                while not stop.is_set():
                    try:
                        summary = run_task(
                            progress=None if self.opts["quiet"] else self._progress, claim_wait=claim_wait
                        )
                        if summary is None and not remote:
                            # Idle: this host does the pool warming asked for over the API or admin.
                            from repopool import services as pool

                            pool.pool_warm_requested()
                    except UNAVAILABLE_ERRORS as exc:
                        if not remote:
                            _drop_connection()
                        outage.began(exc)
                        stop.wait(backoff.next())
                        continue
                    outage.ended()
                    backoff.reset()
                    if summary is None:
                        if self.opts["until_idle"]:
                            return
                        if not remote:  # remote: the claim itself waited (a long poll)
                            stop.wait(1.0)
                        continue
                    with lock:
                        self._print_summary(summary)
                        if summary.status != "succeeded":
                            failures["n"] += 1
            except KeyboardInterrupt:  # the output pipe closed: this task wound down; claim nothing more
                stop.set()
            except LLMNotConfigured as exc:  # this host cannot run what the queue holds: stop claiming
                with lock:
                    not_set_up.append(exc.message)
                    self.stderr.write(f"{exc.message}; stopping once the running tasks finish")
                stop.set()
            except Exception as exc:
                ours = isinstance(exc, DomainError)  # says what happened (a revoked token...): no traceback
                log.error("runagent worker %s died", n, exc_info=not ours)
                with lock:
                    died.append(f"worker {n} died: {exc.message if ours else f'{type(exc).__name__}: {exc}'}")
                    self.stderr.write(f"{died[-1]}; stopping once the running tasks finish")
                stop.set()
            finally:
                if not remote:
                    _drop_connection(always=True)

        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(self.opts["concurrency"])]
        for thread in threads:
            thread.start()
        try:
            while any(t.is_alive() for t in threads):
                for thread in threads:
                    thread.join(timeout=0.5)
        except KeyboardInterrupt:
            self.stderr.write("stopping after the running tasks finish (Ctrl-C again to abort)")
            stop.set()
            for thread in threads:
                thread.join()
        if died:
            raise CommandError("; ".join(died), returncode=WORKER_DIED_EXIT)
        if not_set_up:
            raise CommandError(not_set_up[0], returncode=CONFIG_ERROR_EXIT)
        return failures["n"]

    # --- output ---------------------------------------------------------------------------------
    def _progress(self, info: dict) -> None:
        parts = [f"[{info.get('elapsed', 0):7.1f}s]", info.get("phase", "")]
        if info.get("step") is not None:
            parts.append(f"step {info['step']}")
        if info.get("tokens") is not None:
            parts.append(f"{info['tokens']:,} tokens")
        if info.get("cost") is not None:
            parts.append(f"${info['cost']:.4f}")
        if info.get("note"):
            parts.append(info["note"])
        self.progress_out.line(" · ".join(p for p in parts if p))

    def _print_summary(self, summary) -> None:
        if self.opts["json"]:
            self.stdout.write(json.dumps(summary.as_dict(), default=str))
        else:
            self.stdout.write(format_summary(summary))
