"""The tool definitions the model gets (see docs/agent-tools.md); names and arguments are a contract
with recorded transcripts, so they change only with a new name."""

from __future__ import annotations


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


PATH = {"type": "string", "description": "Path relative to the repository root."}

TOOLS: list[dict] = [
    _fn(
        "list_files",
        "List the files under a folder of the repository (not .git), one per line.",
        {"path": {**PATH, "default": "."}},
        [],
    ),
    _fn(
        "read_file",
        "Read a text file with line numbers; optionally only lines start_line..end_line (1-based, inclusive).",
        {"path": PATH, "start_line": {"type": "integer", "minimum": 1}, "end_line": {"type": "integer", "minimum": 1}},
        ["path"],
    ),
    _fn(
        "search_code",
        "Find lines matching a Python regular expression; answers file:line: text, capped at 200 matches.",
        {"pattern": {"type": "string"}, "path": {**PATH, "default": "."}},
        ["pattern"],
    ),
    _fn(
        "write_file",
        "Create or overwrite a file with the given content (parent folders are created).",
        {"path": PATH, "content": {"type": "string"}},
        ["path", "content"],
    ),
    _fn(
        "edit_file",
        "Replace exactly one occurrence of old_text with new_text. Zero or several matches are an error that shows where.",
        {"path": PATH, "old_text": {"type": "string"}, "new_text": {"type": "string"}},
        ["path", "old_text", "new_text"],
    ),
    _fn("delete_file", "Delete a file.", {"path": PATH}, ["path"]),
    _fn(
        "run_tests",
        "Run the repository's test command, optionally with extra arguments (e.g. a test file), and get the exit code and the tail of the output.",
        {"args": {"type": "array", "items": {"type": "string"}}},
        [],
    ),
    _fn(
        "finish",
        "Say the task is done, with a short summary of what changed and why.",
        {"summary": {"type": "string"}},
        ["summary"],
    ),
]

TOOL_NAMES = [tool["function"]["name"] for tool in TOOLS]

SYSTEM_PROMPT = """You are a careful software engineer working in a git repository through tools.
Rules:
- Read before you edit: use list_files, search_code and read_file to understand the code.
- Change files only with write_file, edit_file and delete_file; paths are relative to the repository root.
- edit_file replaces exactly one occurrence of old_text: copy it exactly, with enough context to be unique.
- Run the tests with run_tests when you have made your change, and fix what fails.
- When the task is complete and the tests pass, call finish with a short summary.
- Do not touch the .git folder. Do not ask questions: nobody will answer; decide and act.
"""
