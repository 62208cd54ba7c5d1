"""Turn a run's artifacts (patch, test log, transcript) into what the run page shows.

No Django models here: plain functions over text, so the bench and tests call them directly.
Every reader is bounded: a huge artifact is cut, a long transcript is paged, never loaded whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html import escape
from typing import Any

from pygments.lexers import get_lexer_for_filename
from pygments.token import STANDARD_TYPES
from pygments.util import ClassNotFound

# The order phases happen in; any other phase the runner reports is drawn after these.
PHASE_ORDER = ["claim", "allocate", "prepare", "agent", "tests", "commit", "artifacts", "finish", "release"]
FOLD_CHARS = 600
FOLD_LINES = 12
# Lexing costs ~0.1-0.3 ms a line here: highlight this many diff lines a page, escape the rest.
HIGHLIGHT_BUDGET = 400


# --- timeline ---------------------------------------------------------------------------------------
@dataclass
class Segment:
    name: str
    seconds: float
    percent: float
    offset: float


def timeline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Phases laid end to end on one axis, each with its share of the attempt's time."""
    phases = metrics.get("phases") or {}
    names = [p for p in PHASE_ORDER if p in phases] + sorted(p for p in phases if p not in PHASE_ORDER)
    durations = [(name, max(float(phases[name] or 0), 0.0)) for name in names]
    total = float(metrics.get("total_seconds") or 0) or sum(s for _, s in durations)
    scale = max(total, sum(s for _, s in durations), 1e-9)
    segments, offset = [], 0.0
    for name, seconds in durations:
        percent = 100 * seconds / scale
        segments.append(Segment(name, seconds, percent, offset))
        offset += percent
    llm = metrics.get("llm") or {}
    llm_seconds = float(llm.get("duration") or 0)
    return {
        "segments": segments,
        "total": total,
        "llm_seconds": llm_seconds,
        "llm_percent": round(100 * llm_seconds / total, 1) if total else 0.0,
        "test_seconds": float(metrics.get("test_seconds") or 0),
        "llm": llm,
    }


# --- diff ---------------------------------------------------------------------------------------------
@dataclass
class DiffLine:
    kind: str  # add | del | ctx | hunk | meta
    old: int | None
    new: int | None
    html: str


@dataclass
class DiffFile:
    path: str
    old_path: str
    added: int = 0
    removed: int = 0
    binary: bool = False
    lines: list[DiffLine] = field(default_factory=list)

    @property
    def rows_html(self) -> str:
        return diff_rows_html(self)


_HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")
# Pygments' CSS class for each token type (its own short names, with our prefix), found once.
_CLASS_CACHE: dict[Any, str] = {}


def _css_class(ttype) -> str:
    cls = _CLASS_CACHE.get(ttype)
    if cls is None:
        walk = ttype
        while walk not in STANDARD_TYPES:
            walk = walk.parent
        short = STANDARD_TYPES.get(walk, "")
        cls = _CLASS_CACHE[ttype] = f"hl-{short}" if short else ""
    return cls


def _lexer_for(path: str):
    try:
        return get_lexer_for_filename(path, stripnl=False, stripall=False, ensurenl=False)
    except ClassNotFound:
        return None


def _highlight_lines(path: str, lines: list[str]) -> list[str]:
    """Highlight a hunk's lines as one block (tokens spanning lines stay right), split back.

    A small formatter of our own: Pygments' HtmlFormatter costs ~3x more per line, and a run page
    with a 2,000-line patch must render in well under half a second."""
    if not lines:
        return []
    lexer = _lexer_for(path)
    if lexer is None:
        return [escape(line) for line in lines]
    out: list[str] = []
    current: list[str] = []
    for ttype, value in lexer.get_tokens("\n".join(lines)):
        cls = _css_class(ttype)
        parts = value.split("\n")
        for index, part in enumerate(parts):
            if index:
                out.append("".join(current))
                current = []
            if part:
                current.append(f'<span class="{cls}">{escape(part)}</span>' if cls else escape(part))
    out.append("".join(current))
    if len(out) < len(lines):  # never lose a line, whatever the lexer did
        out += [""] * (len(lines) - len(out))
    return out[: len(lines)]


def diff_rows_html(diff_file: DiffFile) -> str:
    """The table rows of one file, built here: the template engine is slow for thousands of rows."""
    rows = []
    for line in diff_file.lines:
        sign = "+" if line.kind == "add" else "-" if line.kind == "del" else ""
        old = "" if line.old is None else line.old
        new = "" if line.new is None else line.new
        rows.append(
            f'<tr class="diff-line {line.kind}"><td class="ln">{old}</td><td class="ln">{new}</td>'
            f'<td class="sign">{sign}</td><td class="src">{line.html}</td></tr>'
        )
    return "".join(rows)


def parse_diff(
    text: str, *, max_lines: int = 20_000, highlight_budget: int = HIGHLIGHT_BUDGET
) -> tuple[list[DiffFile], bool]:
    """``git diff`` output as files of highlighted lines; True when cut at ``max_lines``.

    The first ``highlight_budget`` code lines are syntax-highlighted; later ones are only escaped
    (still coloured as added/removed), which keeps a huge patch's page fast."""
    budget = [highlight_budget]
    files: list[DiffFile] = []
    current: DiffFile | None = None
    pending: list[tuple[str, int | None, int | None, str]] = []
    old_no = new_no = 0
    truncated = False

    def flush() -> None:
        if current is None or not pending:
            pending.clear()
            return
        code = [p[3] for p in pending if p[0] in ("add", "del", "ctx")]
        if budget[0] >= len(code):
            highlighted = iter(_highlight_lines(current.path, code))
        else:
            highlighted = iter([escape(line) for line in code])
        budget[0] -= len(code)
        for kind, old, new, raw in pending:
            if kind in ("add", "del", "ctx"):
                current.lines.append(DiffLine(kind, old, new, next(highlighted)))
            else:
                current.lines.append(DiffLine(kind, old, new, escape(raw)))
        pending.clear()

    for count, line in enumerate(text.splitlines()):
        if count >= max_lines:
            truncated = True
            break
        if line.startswith("diff --git "):
            flush()
            parts = line[len("diff --git ") :].split(" b/", 1)
            old_path = parts[0][2:] if parts[0].startswith("a/") else parts[0]
            path = parts[1] if len(parts) > 1 else old_path
            current = DiffFile(path=path, old_path=old_path)
            files.append(current)
            continue
        if current is None:
            continue
        if line == "-- ":  # git format-patch's signature: the mail ends, no more diff lines
            flush()
            current = None
            continue
        match = _HUNK.match(line)
        if match:
            old_no, new_no = int(match.group(1)), int(match.group(2))
            pending.append(("hunk", None, None, line))
        elif line.startswith("Binary files"):
            current.binary = True
            pending.append(("meta", None, None, line))
        elif line.startswith(
            ("--- ", "+++ ", "index ", "new file", "deleted file", "similarity", "rename ", "old mode", "new mode")
        ):
            if line.startswith("rename to "):
                current.path = line[len("rename to ") :]
            continue
        elif line.startswith("+"):
            current.added += 1
            pending.append(("add", None, new_no, line[1:]))
            new_no += 1
        elif line.startswith("-"):
            current.removed += 1
            pending.append(("del", old_no, None, line[1:]))
            old_no += 1
        elif line.startswith("\\"):
            pending.append(("meta", None, None, line))
        else:
            pending.append(("ctx", old_no, new_no, line[1:] if line.startswith(" ") else line))
            old_no += 1
            new_no += 1
    flush()
    return files, truncated


# --- test report ------------------------------------------------------------------------------------
_FAILING = re.compile(
    r"(^FAILED |^ERROR |^E  |Traceback \(most recent call last\)|^_{3,} .* _{3,}$|AssertionError|\bfailed\b)"
)
_EXIT = re.compile(r"^exit code (-?\d+)", re.MULTILINE)


@dataclass
class ReportLine:
    text: str
    failing: bool


def report_tail(text: str, *, lines: int = 200) -> dict[str, Any]:
    """The last ``lines`` lines, with the failing ones marked and the first of them to scroll to."""
    all_lines = text.splitlines()
    tail = all_lines[-lines:]
    marked = [ReportLine(line, bool(_FAILING.search(line))) for line in tail]
    first = next((i for i, line in enumerate(marked) if line.failing), None)
    match = _EXIT.search(text[:200])
    return {
        "lines": marked,
        "first_failing": first,
        "cut": len(all_lines) - len(tail),
        "exit_code": int(match.group(1)) if match else None,
    }


# --- transcript -------------------------------------------------------------------------------------
@dataclass
class ToolStep:
    name: str
    arguments: str
    result: str = ""
    ok: bool | None = None
    duration: float | None = None

    @property
    def folded(self) -> bool:
        return len(self.result) > FOLD_CHARS or self.result.count("\n") > FOLD_LINES

    @property
    def preview(self) -> str:
        head = "\n".join(self.result.splitlines()[:FOLD_LINES])
        return head[:FOLD_CHARS]

    @property
    def pretty_arguments(self) -> str:
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return self.arguments
        return json.dumps(value, indent=2, ensure_ascii=False)


@dataclass
class Step:
    number: int
    model: str = ""
    content: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: str | None = None
    duration: float | None = None
    attempts: int = 1
    finish_reason: str = ""
    tools: list[ToolStep] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    user_messages: list[str] = field(default_factory=list)


def _starts(line: str, kind: str) -> bool:
    # The recorder writes ``{"type": "<kind>", ...}`` first: cheap to count without parsing.
    return line.startswith('{"type": "' + kind + '"')


def transcript_page(lines, *, page: int = 1, per_page: int = 50) -> dict[str, Any]:
    """One page of the conversation from transcript JSONL lines (an iterable, read once).

    A step starts at each model request; only the lines of the requested page are parsed, so a
    5,000-step transcript costs a scan, not 5,000 JSON documents."""
    first, last = (page - 1) * per_page + 1, page * per_page
    steps: list[Step] = []
    step_no = 0
    current: Step | None = None
    prelude: list[str] = []
    for raw in lines:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        line = raw.strip()
        if not line:
            continue
        if _starts(line, "request"):
            step_no += 1
            current = None
            if first <= step_no <= last:
                record = _loads(line)
                current = Step(number=step_no, model=record.get("model", ""))
                for message in record.get("messages") or []:
                    if message.get("role") == "user" and message.get("content"):
                        current.user_messages.append(str(message["content"]))
                    elif step_no == 1 and message.get("role") == "system":
                        prelude.append(str(message.get("content") or ""))
                steps.append(current)
            continue
        if current is None:
            continue
        record = _loads(line)
        kind = record.get("type")
        if kind == "response":
            message = record.get("message") or {}
            current.content = message.get("content") or ""
            current.prompt_tokens = int(record.get("prompt_tokens") or 0)
            current.completion_tokens = int(record.get("completion_tokens") or 0)
            current.cost_usd = record.get("cost_usd")
            current.duration = record.get("duration")
            current.attempts = int(record.get("attempts") or 1)
            current.finish_reason = record.get("finish_reason") or ""
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                current.tools.append(ToolStep(function.get("name", "?"), function.get("arguments") or ""))
        elif kind == "tool_call":
            target = next((t for t in current.tools if t.ok is None and t.name == record.get("name")), None)
            if target is None:
                target = ToolStep(record.get("name", "?"), record.get("arguments") or "")
                current.tools.append(target)
            target.result = str(record.get("result") or "")
            target.ok = bool(record.get("ok"))
            target.duration = record.get("duration")
        elif kind in ("error", "retry"):
            current.errors.append(record)
    pages = max(1, -(-step_no // per_page))
    return {"steps": steps, "total_steps": step_no, "page": page, "pages": pages, "system": "\n".join(prelude)}


def _loads(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {"type": "unreadable", "message": line[:200]}
    return value if isinstance(value, dict) else {"type": "unreadable"}
