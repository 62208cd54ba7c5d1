"""Re-record the demo's transcript (after a change to the system prompt, the tools or the demo):

    .venv/bin/python tests/record_demo.py

It runs the demo against the scripted local OpenAI-compatible server and writes
agentrunner/demo_data/transcript.jsonl from the run's transcript artifact."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def demo_policy(request):
    from tests.llm_server import completion

    done = [m for m in request["messages"] if m["role"] == "tool"]
    steps = [
        ("read_file", {"path": "calc.py"}),
        ("edit_file", {"path": "calc.py", "old_text": "    return a - b", "new_text": "    return a + b"}),
        ("run_tests", {"args": []}),
        ("finish", {"summary": "add() returned a - b; it now returns a + b, and the tests pass."}),
    ]
    name, args = steps[min(len(done), len(steps) - 1)]
    return completion(None, (name, args), usage=(900 + 150 * len(done), 60), model="gpt-4o-mini")


def main() -> None:
    data = Path(tempfile.mkdtemp(prefix="record-demo-"))
    os.environ.update(
        AGENTRUNNER_DATA_DIR=str(data),
        DATABASE_URL=f"sqlite:///{data / 'db.sqlite3'}",
        DJANGO_SETTINGS_MODULE="agentrunner.settings",
    )
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from artifacts.services import artifact_open
    from registry.models import Task
    from tests.llm_server import LLMServer

    call_command("migrate", verbosity=0)
    server = LLMServer().start()
    server.responder = demo_policy
    settings.OPENAI_BASE_URL = server.base_url
    settings.OPENAI_API_KEY = "recording"
    settings.AGENTRUNNER_LLM_MODEL = "gpt-4o-mini"
    call_command("demo", "--live", "--quiet")
    task = Task.objects.get()
    link = task.artifact_links.get(role="transcript")
    target = ROOT / "agentrunner" / "demo_data" / "transcript.jsonl"
    with artifact_open(artifact=link.artifact) as fh:
        target.write_bytes(fh.read())
    server.stop()
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
