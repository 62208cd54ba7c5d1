from __future__ import annotations

import json
import shutil
import time
from decimal import Decimal

import pytest

from agentrunner.agent.loop import Agent, Budget
from agentrunner.agent.workspace import Workspace
from agentrunner.llm.client import LLMClient, Transcript
from agentrunner.llm.config import LLMConfig
from tests.llm_server import Reply, completion, error, tool


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (root / "util.py").write_text("NAME = 'x'\n")
    return root


def run(make_client, folder, *, budget=None, events=None, run_tests=None, transcript=None, **agent_kw):
    client = make_client(transcript)
    agent = Agent(
        client=client,
        workspace=Workspace(folder),
        run_tests=run_tests,
        on_event=(lambda t, m, d: events.append((t, m, d))) if events is not None else (lambda *a: None),
        **agent_kw,
    )
    return agent, agent.start("Fix add() so it adds.", budget or Budget(max_steps=20))


def test_simple_code_generation(make_client, llm_server, folder):
    llm_server.add(
        tool("write_file", path="hello.py", content="def hello():\n    return 'hi'\n"),
        tool("finish", summary="added hello()"),
    )
    agent, result = run(make_client, folder)
    assert result.ok and result.summary == "added hello()" and result.steps == 2
    assert (folder / "hello.py").read_text() == "def hello():\n    return 'hi'\n"
    first = llm_server.requests[0]
    assert first["messages"][0]["role"] == "system"
    assert "Fix add()" in first["messages"][1]["content"] and "calc.py" in first["messages"][1]["content"]
    assert {t["function"]["name"] for t in first["tools"]} == {
        "list_files", "read_file", "search_code", "write_file", "edit_file", "delete_file", "run_tests", "finish",
    }  # fmt: skip


def test_modifying_existing_code_and_several_files(make_client, llm_server, folder):
    llm_server.add(
        tool("read_file", path="calc.py"),
        completion(
            None,
            ("edit_file", {"path": "calc.py", "old_text": "a - b", "new_text": "a + b"}),
            ("edit_file", {"path": "util.py", "old_text": "'x'", "new_text": "'calc'"}),
        ),
        tool("delete_file", path="util.py"),
        tool("finish", summary="fixed"),
    )
    events = []
    agent, result = run(make_client, folder, events=events)
    assert result.ok
    assert "a + b" in (folder / "calc.py").read_text() and not (folder / "util.py").exists()
    assert agent.workspace.changed == {"calc.py", "util.py"}
    read_result = llm_server.requests[1]["messages"][-1]
    assert read_result["role"] == "tool" and "    2|     return a - b" in read_result["content"]
    tool_events = [(d["tool"], d.get("path"), d["ok"]) for t, m, d in events if t == "tool_call"]
    assert tool_events == [
        ("read_file", "calc.py", True),
        ("edit_file", "calc.py", True),
        ("edit_file", "util.py", True),
        ("delete_file", "util.py", True),
        ("finish", None, True),
    ]


def test_unknown_tool_and_invalid_json_go_back_to_the_model(make_client, llm_server, folder):
    llm_server.add(
        tool("rm_rf", path="/"),
        completion(None, ("write_file", '{"path": "a.py", "content": ')),
        tool("finish", summary="done"),
    )
    agent, result = run(make_client, folder)
    assert result.ok
    results = [m["content"] for m in llm_server.requests[2]["messages"] if m["role"] == "tool"]
    assert results[0].startswith("error: unknown tool 'rm_rf'")
    assert "not valid JSON" in results[1]
    assert not (folder / "a.py").exists()


def test_path_escape_is_a_tool_error_not_a_crash(make_client, llm_server, folder):
    llm_server.add(tool("read_file", path="../../etc/passwd"), tool("finish", summary="ok"))
    _, result = run(make_client, folder)
    assert result.ok
    assert "'..' is not allowed" in llm_server.requests[1]["messages"][-1]["content"]


def test_syntax_error_blocks_finish_until_fixed(make_client, llm_server, folder):
    llm_server.add(
        tool("write_file", path="calc.py", content="def add(a, b:\n    return a + b\n"),
        tool("finish", summary="too early"),
        tool("write_file", path="calc.py", content="def add(a, b):\n    return a + b\n"),
        tool("finish", summary="fixed properly"),
    )
    _, result = run(make_client, folder)
    assert result.ok and result.summary == "fixed properly"
    tool_results = [m["content"] for m in llm_server.requests[3]["messages"] if m["role"] == "tool"]
    assert "does not parse: SyntaxError at line 1" in tool_results[0]
    assert "cannot finish while changed files do not parse" in tool_results[1]


def test_token_usage_is_summed_over_calls(make_client, llm_server, folder):
    llm_server.add(
        Reply(body=tool("list_files")),
        error(503, "busy"),
        completion(None, ("finish", {"summary": "ok"}), usage=(300, 30)),
    )
    events = []
    agent, result = run(make_client, folder, events=events)
    totals = agent.client.totals
    assert (totals.prompt_tokens, totals.completion_tokens, totals.calls, totals.retries) == (400, 50, 2, 1)
    assert totals.cost == Decimal("0.0005")
    assert [t for t, m, d in events if t in ("llm_call", "llm_retry")] == ["llm_call", "llm_retry", "llm_call"]


def test_step_limit(make_client, llm_server, folder):
    llm_server.responder = lambda request: tool("list_files")
    _, result = run(make_client, folder, budget=Budget(max_steps=4))
    assert result.outcome == "budget_exceeded" and result.failure_reason == "budget_exceeded"
    assert result.steps == 4 and len(llm_server.requests) == 4


def test_token_limit_counts_billed_tokens(make_client, llm_server, folder):
    llm_server.responder = lambda request: completion(None, ("read_file", {"path": "calc.py"}), usage=(900, 100))
    _, result = run(make_client, folder, budget=Budget(max_steps=100, max_tokens=2500))
    assert result.outcome == "budget_exceeded" and "token limit" in result.message
    assert len(llm_server.requests) == 3


def test_cost_limit(make_client, llm_server, folder):
    # $1/M input, $2/M output: each call costs $0.0012.
    llm_server.responder = lambda request: completion(None, ("list_files", {}), usage=(1000, 100))
    _, result = run(make_client, folder, budget=Budget(max_steps=100, max_cost=Decimal("0.003")))
    assert result.outcome == "budget_exceeded" and "cost limit" in result.message
    assert len(llm_server.requests) == 3


def test_wall_clock_timeout(make_client, llm_server, folder):
    llm_server.responder = lambda request: Reply(body=tool("list_files"), delay=0.2)
    started = time.monotonic()
    _, result = run(make_client, folder, budget=Budget(max_steps=100, deadline=time.monotonic() + 0.5))
    assert result.outcome == "timeout" and result.failure_reason == "timeout"
    assert time.monotonic() - started < 2


def test_stuck_loop_detector_on_same_failing_action(make_client, llm_server, folder):
    llm_server.responder = lambda request: tool("edit_file", path="calc.py", old_text="nope", new_text="x")
    _, result = run(make_client, folder)
    assert result.outcome == "stuck" and result.failure_reason == "implementation_failed"
    assert "3 times" in result.message and len(llm_server.requests) == 3


def test_replies_without_tool_calls_three_times(make_client, llm_server, folder):
    llm_server.responder = lambda request: completion("I think we should fix it.")
    _, result = run(make_client, folder)
    assert result.outcome == "no_progress" and result.failure_reason == "implementation_failed"
    assert len(llm_server.requests) == 3


def test_cancellation_between_calls(make_client, llm_server, folder):
    calls = {"n": 0}

    def responder(request):
        calls["n"] += 1
        return tool("list_files")

    llm_server.responder = responder
    _, result = run(make_client, folder, should_cancel=lambda: calls["n"] >= 2)
    assert result.outcome == "cancelled" and len(llm_server.requests) == 2


def test_llm_error_ends_the_loop(make_client, llm_server, folder):
    llm_server.add(error(401, "bad key"))
    _, result = run(make_client, folder)
    assert result.outcome == "llm_error" and result.llm_error.kind == "authentication"


def test_run_tests_tool_and_failing_runs_count_as_stuck(make_client, llm_server, folder):
    runs = []

    def run_tests(args):
        runs.append(args)
        return 1, "1 failed"

    llm_server.add(tool("run_tests", args=["-k", "add"]))
    llm_server.responder = lambda request: tool("run_tests")
    _, result = run(make_client, folder, run_tests=run_tests)
    assert runs[0] == ["-k", "add"]
    assert "exit code 1\n1 failed" in llm_server.requests[1]["messages"][-1]["content"]
    assert result.outcome == "stuck"


def test_record_then_replay_offline_and_divergence(make_client, llm_server, folder, tmp_path):
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)
    recording = tmp_path / "recording.jsonl"
    llm_server.add(
        tool("read_file", path="calc.py"),
        tool("edit_file", path="calc.py", old_text="a - b", new_text="a + b"),
        tool("finish", summary="fixed add"),
    )
    _, recorded = run(make_client, folder, transcript=recording)
    assert recorded.ok
    types = [json.loads(line)["type"] for line in recording.read_text().splitlines()]
    assert types.count("request") == 3 and types.count("response") == 3 and types.count("tool_call") == 3

    replay_dir = tmp_path / "replay"
    shutil.copytree(pristine, replay_dir)
    replay = LLMClient(LLMConfig(provider="replay", replay_file=str(recording)), transcript=Transcript())
    agent = Agent(client=replay, workspace=Workspace(replay_dir))
    result = agent.start("Fix add() so it adds.", Budget(max_steps=20))
    assert result.ok and result.summary == "fixed add"
    assert (replay_dir / "calc.py").read_text() == (folder / "calc.py").read_text()
    assert replay.totals.prompt_tokens == 300

    diverged_dir = tmp_path / "diverged"
    shutil.copytree(pristine, diverged_dir)
    replay = LLMClient(LLMConfig(provider="replay", replay_file=str(recording)), transcript=Transcript())
    agent = Agent(client=replay, workspace=Workspace(diverged_dir))
    result = agent.start("Something else entirely.", Budget(max_steps=20))
    assert result.outcome == "llm_error" and result.llm_error.kind == "replay_diverged"
    assert "message 1 differs" in result.message


def test_the_repository_map_lists_files_as_a_top_down_os_walk_would(tmp_path):
    """The first message's map: the order and the count of ``os.walk`` (a folder's files before its
    sub-folders'), symbolic links to folders listed nowhere and not entered, .git under any case
    and the skipped folders left out, cut at the limit."""
    import os

    from agentrunner.agent.loop import repository_map
    from agentrunner.agent.workspace import SKIP_DIRS, Workspace, is_git_name

    root = tmp_path / "repo"
    files = ("b/deep/x.py", "b/a.py", "a/z.py", "Z", "é ü/ñ.txt", ".GIT/config", ".venv/lib.py", "s/node_modules/m")
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    (root / ".git").write_text("gitdir: elsewhere\n")
    os.symlink("b", root / "link-to-folder")
    os.symlink("Z", root / "link-to-file")
    os.symlink("nowhere", root / "dangling")
    os.mkfifo(root / "fifo")

    def reference(limit: int) -> str:  # what the map was built with before
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not is_git_name(d))
            files.extend(os.path.relpath(os.path.join(folder, n), root) for n in sorted(names) if not is_git_name(n))
        more = f"\n… and {len(files) - limit} more files" if len(files) > limit else ""
        return f"Repository files ({len(files)}):\n" + "\n".join(files[:limit]) + more

    ws = Workspace(root)
    assert repository_map(ws).splitlines() == [
        "Repository files (8):", "Z", "dangling", "fifo", "link-to-file", "a/z.py", "b/a.py", "b/deep/x.py", "é ü/ñ.txt",
    ]  # fmt: skip
    for limit in (0, 1, 5, 8, 200):
        assert repository_map(ws, limit) == reference(limit)


def test_the_map_reads_again_only_the_folders_that_changed(tmp_path, monkeypatch):
    """A second map of the same tree stats each folder and reads only those whose entries changed;
    what a symbolic link points to is checked every time. The map stays what os.walk shows."""
    import os

    from agentrunner.agent import repomap
    from agentrunner.agent.loop import repository_map
    from agentrunner.agent.workspace import SKIP_DIRS, Workspace, is_git_name

    root = tmp_path / "repo"
    for name in ("a/b/c.py", "a/d.py", "e/f.txt", "g/h/i.txt", "target-file", "top.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    os.symlink("target-file", root / "e" / "link")  # a link to a file: listed
    (root / "later-a-folder").write_text("x")
    os.symlink("../later-a-folder", root / "g" / "link2")

    def reference() -> str:
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not is_git_name(d))
            files.extend(os.path.relpath(os.path.join(folder, n), root) for n in sorted(names) if not is_git_name(n))
        return f"Repository files ({len(files)}):\n" + "\n".join(files)

    # Folders changed less than RACY_NS before a map are read again: here every folder is new, so
    # the limit is lifted and each change below is made a tick of the file clock later.
    monkeypatch.setattr(repomap, "RACY_NS", 0)
    repomap.forget()
    reads: list[str] = []
    real_scandir = os.scandir
    monkeypatch.setattr(repomap.os, "scandir", lambda path: reads.append(path) or real_scandir(path))
    ws = Workspace(root)
    time.sleep(0.05)

    first = repository_map(ws)
    assert len(reads) == 6  # the root, a, a/b, e, g, g/h
    del reads[:]
    assert repository_map(ws) == first and reads == []  # nothing changed: nothing read

    time.sleep(0.05)
    (root / "a" / "b" / "new.py").write_text("x")  # a file added deep down
    (root / "top.txt").unlink()
    (root / "top.txt").mkdir()  # a file turned into a folder
    (root / "top.txt" / "inside.py").write_text("x")
    (root / "later-a-folder").unlink()
    (root / "later-a-folder").mkdir()  # g/link2 now points to a folder: no longer listed; g unchanged
    expected = reference()  # (os.walk reads through the same os.scandir)
    del reads[:]
    assert repository_map(ws, limit=1000) == expected
    assert sorted(reads) == sorted(str(p) for p in (root, root / "a" / "b", root / "top.txt", root / "later-a-folder"))
    assert "g/link2" not in expected and "e/link" in expected and "top.txt/inside.py" in expected


def test_the_kept_listings_are_bounded_and_the_least_recent_tree_goes_first(tmp_path, monkeypatch):
    from agentrunner.agent import repomap
    from agentrunner.agent.loop import repository_map
    from agentrunner.agent.workspace import Workspace

    monkeypatch.setattr(repomap, "RACY_NS", 0)
    monkeypatch.setattr(repomap, "CACHED_FOLDERS", 5)
    repomap.forget()
    trees = []
    for n in range(3):
        root = tmp_path / f"t{n}"
        (root / "a" / "b").mkdir(parents=True)  # three folders a tree: root, a, a/b
        (root / "a" / "b" / "f.py").write_text("x")
        trees.append(root)
    time.sleep(0.05)  # the folders' times a tick of the file clock before the maps
    for root in trees[:2]:
        assert repository_map(Workspace(root)) == "Repository files (1):\na/b/f.py"
    assert list(repomap._trees) == [str(trees[1])] and repomap._kept_folders == 3  # 6 > 5: the first went
    repository_map(Workspace(trees[0]))
    repository_map(Workspace(trees[1]))  # mapped again: the most recent now
    assert list(repomap._trees) == [str(trees[1])] and repomap._kept_folders == 3
    big = tmp_path / "big"
    for n in range(6):
        (big / f"d{n}").mkdir(parents=True)
    time.sleep(0.05)
    repository_map(Workspace(big))  # 7 folders, more than the bound alone: not kept, nothing else lost
    assert list(repomap._trees) == [str(trees[1])] and repomap._kept_folders == 3
    repomap.forget()
