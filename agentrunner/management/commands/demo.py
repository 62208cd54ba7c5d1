"""The quick start: a small sample project with a failing test, a task that fixes it, run by the
runner. By default the model's answers are replayed from a recorded transcript shipped with the
project (no API key, no network); --live uses the configured OpenAI-compatible endpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agentrunner.runner.summary import Progress, format_summary, origin, quiet_logs, silence_output
from common.schema import require_schema

TRANSCRIPT = Path(__file__).resolve().parents[2] / "demo_data" / "transcript.jsonl"
INSTRUCTIONS = "The test for calc.add fails: add() subtracts. Fix add() so the tests pass."
FILES = {
    "README.md": "# calc\n\nA tiny calculator library.\n",
    "calc.py": 'def add(a, b):\n    """Return the sum of a and b."""\n    return a - b\n\n\ndef multiply(a, b):\n    return a * b\n',
    "test_calc.py": "from calc import add, multiply\n\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\ndef test_multiply():\n    assert multiply(4, 5) == 20\n",
}
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Demo",
    "GIT_AUTHOR_EMAIL": "demo@example.com",
    "GIT_COMMITTER_NAME": "Demo",
    "GIT_COMMITTER_EMAIL": "demo@example.com",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}


def make_sample_project(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for name, content in FILES.items():
        (path / name).write_text(content)
    env = {**os.environ, **GIT_IDENTITY}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "calc: add and multiply"]):
        subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True)
    return path


class Command(BaseCommand):
    help = "Run the quick-start demo: a sample project with a failing test and a task that fixes it."

    def add_arguments(self, parser):
        parser.add_argument("--live", action="store_true", help="Use the real model (OPENAI_API_KEY, OPENAI_BASE_URL).")
        parser.add_argument(
            "--replay-file", default=str(TRANSCRIPT), help="Transcript to replay (default: the shipped one)."
        )
        parser.add_argument("--quiet", action="store_true")

    def handle(self, *args, **opts):
        self.out = Progress(self.stderr)
        try:
            self._handle(**opts)
        except KeyboardInterrupt:
            # A closed pipe (or Ctrl-C): the task wound down (slot released, queued again with its replay).
            if not self.out.closed:
                self.stderr.write("interrupted: the slot was released and the task queued again")
            sys.exit(130)
        except BrokenPipeError:  # the reader went away before or after the run: nothing to clean up
            silence_output()
            sys.exit(130)

    def _handle(self, *, live, replay_file, quiet, **opts):
        from agentrunner.llm.config import config_problem, from_settings
        from agentrunner.runner.pipeline import run_task

        quiet_logs(opts.get("verbosity", 1))
        require_schema()
        from registry.services import task_create
        from repopool.models import Repository
        from repopool.services import repository_create, repository_update

        # The shipped transcript replays offline; --live uses the configured provider.
        llm_config = {"provider": "openai"} if live else {"provider": "replay", "replay_file": replay_file}
        problem = config_problem(from_settings(**llm_config))
        if problem:
            raise CommandError(f"no usable LLM: {problem}", returncode=2)
        project = make_sample_project(Path(settings.DATA_DIR) / "demo" / "sample-project")
        test_command = f"{sys.executable} -m pytest -q -p no:cacheprovider"
        repo = Repository.objects.filter(name="demo-sample").first()
        if repo is None:
            repo = repository_create(name="demo-sample", url=str(project), pool_size=1, test_command=test_command)
        else:
            repo = repository_update(repository=repo, url=str(project), test_command=test_command)
            from repopool.services import repository_delete_slots

            repository_delete_slots(repository=repo)  # the sample project was just re-created
        # The replay is stored on the task: whoever runs it next (`runagent --next` after an
        # interrupted demo) replays it too, never spending on a real model.
        task = task_create(
            title="Fix calc.add", instructions=INSTRUCTIONS, repository=repo, max_steps=20, llm_config=llm_config
        )
        self.stderr.write(f"sample project: {project}")
        self.stderr.write(f"task {task.pk}: {INSTRUCTIONS}")
        self.stderr.write(
            "model: " + (f"{settings.AGENTRUNNER_LLM_MODEL} (live)" if live else f"replaying {replay_file}")
        )

        out = self.out

        def progress(info):
            if quiet:
                return
            parts = [f"[{info.get('elapsed', 0):6.2f}s]", info.get("phase", "")]
            if info.get("step") is not None:
                parts.append(f"step {info['step']} · {info.get('tokens', 0):,} tokens")
            if info.get("note"):
                parts.append(info["note"])
            out.line(" ".join(parts))

        summary = run_task(task_id=task.pk, progress=progress)
        self.stdout.write(format_summary(summary))
        if summary.status != "succeeded":
            raise CommandError(f"the demo task ended {summary.status}: {summary.message}")
        self.stdout.write("")
        self.stdout.write(f"See the change:  cd {project} && {summary.fetch} && git show FETCH_HEAD")
        self.stdout.write(
            f"Open the API and the admin:  make serve  (then {origin(summary.api_url)}/admin/; first user: "
            "`.venv/bin/python manage.py createsuperuser`, API token: `.venv/bin/python manage.py create_api_token alice`)"
        )
        self.stdout.write(
            "Run it with a real model:  OPENAI_API_KEY=sk-... make demo-live  (OPENAI_BASE_URL for other servers)"
        )
