"""Git ref names a runner may report: the rules of ``git check-ref-format`` for a branch, and the
shape of the result branches Agent Runner creates (``agent/<task short id>``, optionally with a
``-suffix``). Free of Django."""

from __future__ import annotations

import re

RESULT_BRANCH_PREFIX = "agent/"
BRANCH_MAX = 255  # one path component per ref folder on most file systems
RESULT_SUFFIX_RE = re.compile(r"\A-[A-Za-z0-9._-]{1,64}\Z")
_FORBIDDEN = frozenset(" ~^:?*[\\")


def branch_name_problem(name: str) -> str | None:
    """Why ``refs/heads/<name>`` is not a valid branch (``git check-ref-format --branch``), in
    a few words; None when it is. Also refused: a leading '-' (git would read an option) and
    anything but printable ASCII."""
    if not name:
        return "is empty"
    if len(name) > BRANCH_MAX:
        return f"is longer than {BRANCH_MAX} characters"
    for char in name:
        if ord(char) < 32 or ord(char) == 127:
            return "contains a control character"
        if not char.isascii():
            return "contains a character outside printable ASCII"
        if char in _FORBIDDEN:
            return f"contains {char!r}"
    if name.startswith("-"):
        return "starts with '-'"
    if name == "@":
        return "is '@'"
    if "@{" in name:
        return "contains '@{'"
    if ".." in name:
        return "contains '..'"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "has an empty path component"
    if name.endswith("."):
        return "ends with '.'"
    for component in name.split("/"):
        if component.startswith("."):
            return "has a path component starting with '.'"
        if component.endswith(".lock"):
            return "has a path component ending with '.lock'"
    return None


def result_branch_problem(name: str, short_id: str | None = None) -> str | None:
    """Why ``name`` is not a result branch Agent Runner would create (None when it is): a valid
    branch under ``agent/``, and with ``short_id`` that task's own (``agent/<short_id>`` or
    ``agent/<short_id>-<suffix>``)."""
    problem = branch_name_problem(name)
    if problem:
        return problem
    if not name.startswith(RESULT_BRANCH_PREFIX):
        return f"must start with {RESULT_BRANCH_PREFIX!r}"
    if short_id is not None:
        own = f"{RESULT_BRANCH_PREFIX}{short_id}"
        if name != own and not (name.startswith(own) and RESULT_SUFFIX_RE.match(name[len(own) :])):
            return f"must be this task's branch {own!r} (optionally with a '-suffix')"
    return None
