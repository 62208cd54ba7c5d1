"""The agent's file tools, confined to one working copy.

Every path is relative to the working copy. Refused: absolute paths, ``..`` escapes, anything
whose real location (symlinks followed, in the file or any parent folder) lies outside, and
anything under ``.git``. Tool errors are returned to the model as text; they never raise out.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MAX_LIST = 2000
MAX_READ_LINES = 2000
MAX_READ_BYTES = 256 * 1024
MAX_MATCHES = 200
MAX_SEARCH_FILE = 1024 * 1024
MAX_WRITE_BYTES = 2 * 1024 * 1024
SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


class ToolError(Exception):
    """A refusal or failure the model can read and act on."""


@dataclass
class Workspace:
    root: Path
    changed: set[str] = field(default_factory=set)
    # Files written or edited that do not parse right now (path -> error); `finish` checks it.
    broken: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._real_root = os.path.realpath(self.root)

    # --- confinement ----------------------------------------------------------------------------
    def resolve(self, path: str, *, must_exist: bool = False) -> Path:
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path must be a non-empty string")
        if "\x00" in path:
            raise ToolError("path contains a NUL character")
        if os.path.isabs(path) or path.startswith("~"):
            raise ToolError(f"{path}: absolute paths are not allowed; use a path relative to the repository root")
        parts = Path(path).parts
        if ".." in parts:
            raise ToolError(f"{path}: '..' is not allowed; paths stay inside the repository")
        if ".git" in parts:
            raise ToolError(f"{path}: the .git folder is off limits")
        candidate = self.root / path
        real = os.path.realpath(candidate)
        if os.path.commonpath([real, self._real_root]) != self._real_root:
            raise ToolError(f"{path}: resolves outside the repository (through a symlink)")
        if ".git" in Path(os.path.relpath(real, self._real_root)).parts:
            raise ToolError(f"{path}: the .git folder is off limits")
        if must_exist and not os.path.exists(real):
            raise ToolError(f"{path}: no such file")
        return Path(real)

    def rel(self, real: Path) -> str:
        return os.path.relpath(real, self._real_root)

    # --- tools ----------------------------------------------------------------------------------
    def list_files(self, path: str = ".") -> str:
        base = self.resolve(path or ".", must_exist=True)
        if not base.is_dir():
            raise ToolError(f"{path}: not a folder")
        found: list[str] = []
        for folder, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            for name in sorted(files):
                found.append(self.rel(Path(folder) / name))
                if len(found) >= MAX_LIST:
                    return "\n".join(found) + f"\n… (stopped at {MAX_LIST} files; list a subfolder)"
        return "\n".join(found) if found else "(no files)"

    def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        real = self.resolve(path, must_exist=True)
        if real.is_dir():
            raise ToolError(f"{path}: is a folder; use list_files")
        data = real.read_bytes()
        if b"\x00" in data[:8192]:
            raise ToolError(f"{path}: binary file ({len(data)} bytes)")
        lines = data.decode("utf-8", errors="replace").splitlines()
        start = max(1, int(start_line or 1))
        end = min(len(lines), int(end_line or len(lines)), start + MAX_READ_LINES - 1)
        if start > max(1, len(lines)):
            raise ToolError(f"{path}: has {len(lines)} lines; start_line {start} is past the end")
        out, size = [], 0
        for number in range(start, end + 1):
            line = f"{number:>5}| {lines[number - 1]}"
            size += len(line) + 1
            if size > MAX_READ_BYTES:
                out.append(f"… (cut at {MAX_READ_BYTES} bytes; read from line {number})")
                break
            out.append(line)
        if end < len(lines) and size <= MAX_READ_BYTES:
            out.append(f"… ({len(lines) - end} more lines; read from line {end + 1})")
        return "\n".join(out) if out else "(empty file)"

    def search_code(self, pattern: str, path: str = ".") -> str:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ToolError(f"invalid regular expression: {exc}") from None
        base = self.resolve(path or ".", must_exist=True)
        files = [base] if base.is_file() else []
        if base.is_dir():
            for folder, dirs, names in os.walk(base):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
                files.extend(Path(folder) / n for n in sorted(names))
        matches: list[str] = []
        for file in files:
            try:
                if file.stat().st_size > MAX_SEARCH_FILE:
                    continue
                data = file.read_bytes()
            except OSError:
                continue
            if b"\x00" in data[:8192]:
                continue
            for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
                if regex.search(line):
                    matches.append(f"{self.rel(file)}:{number}: {line[:300]}")
                    if len(matches) >= MAX_MATCHES:
                        return (
                            "\n".join(matches) + f"\n… (stopped at {MAX_MATCHES} matches; narrow the pattern or path)"
                        )
        return "\n".join(matches) if matches else "no matches"

    def write_file(self, path: str, content: str) -> str:
        if not isinstance(content, str):
            raise ToolError("content must be a string")
        if len(content.encode()) > MAX_WRITE_BYTES:
            raise ToolError(f"content larger than {MAX_WRITE_BYTES} bytes")
        real = self.resolve(path)
        if real.is_dir():
            raise ToolError(f"{path}: is a folder")
        existed = real.exists()
        real.parent.mkdir(parents=True, exist_ok=True)
        # Re-check after creating parents: a folder created through a symlink must still be inside.
        self.resolve(path)
        real.write_text(content, encoding="utf-8")
        return self._after_change(
            path, real, f"{'overwrote' if existed else 'created'} {path} ({len(content)} characters)"
        )

    def edit_file(self, path: str, old_text: str, new_text: str) -> str:
        real = self.resolve(path, must_exist=True)
        if not isinstance(old_text, str) or not isinstance(new_text, str) or old_text == "":
            raise ToolError("old_text must be a non-empty string and new_text a string")
        text = real.read_text(encoding="utf-8", errors="replace")
        count = text.count(old_text)
        if count == 0:
            raise ToolError(f"{path}: old_text was not found. {self._nearest(text, old_text)}")
        if count > 1:
            lines = [text[: m.start()].count("\n") + 1 for m in re.finditer(re.escape(old_text), text)]
            raise ToolError(
                f"{path}: old_text occurs {count} times (lines {', '.join(map(str, lines[:20]))}); "
                "include more surrounding lines so it matches exactly once"
            )
        real.write_text(text.replace(old_text, new_text, 1), encoding="utf-8")
        return self._after_change(path, real, f"edited {path}")

    def delete_file(self, path: str) -> str:
        real = self.resolve(path, must_exist=True)
        if real.is_dir():
            raise ToolError(f"{path}: is a folder; delete its files one by one")
        real.unlink()
        rel = self.rel(real)
        self.changed.add(rel)
        self.broken.pop(rel, None)
        return f"deleted {path}"

    # --- helpers --------------------------------------------------------------------------------
    def _after_change(self, path: str, real: Path, message: str) -> str:
        rel = self.rel(real)
        self.changed.add(rel)
        problem = check_syntax(real)
        if problem:
            self.broken[rel] = problem
            return f"{message}, but it does not parse: {problem}. Fix it before finishing."
        self.broken.pop(rel, None)
        return message

    @staticmethod
    def _nearest(text: str, wanted: str) -> str:
        lines = text.splitlines()
        want = wanted.splitlines() or [wanted]
        width = len(want)
        best, best_at = 0.0, 0
        for i in range(max(1, len(lines) - width + 1)):
            ratio = difflib.SequenceMatcher(None, "\n".join(lines[i : i + width]), wanted).quick_ratio()
            if ratio > best:
                best, best_at = ratio, i
        if not lines:
            return "The file is empty."
        shown = "\n".join(f"{n + 1:>5}| {lines[n]}" for n in range(best_at, min(len(lines), best_at + width + 2)))
        return f"The closest lines (similarity {best:.0%}) are:\n{shown}"


def check_syntax(real: Path) -> str | None:
    """Python, JSON and TOML files must parse; returns the problem or None."""
    suffix = real.suffix.lower()
    try:
        if suffix == ".py":
            compile(real.read_bytes(), str(real.name), "exec", dont_inherit=True)
        elif suffix == ".json":
            json.loads(real.read_text(encoding="utf-8"))
        elif suffix == ".toml":
            tomllib.loads(real.read_text(encoding="utf-8"))
    except SyntaxError as exc:
        return f"SyntaxError at line {exc.lineno}: {exc.msg}"
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


TestRunner = Callable[[list[str]], tuple[int | None, str]]
