"""The agent's file tools, confined to one working copy.

Every path is relative to the working copy. Refused: absolute paths, ``..`` escapes, anything
under ``.git`` (in any letter case), and anything a symlink leads outside. Tool errors are
returned to the model as text; they never raise out.

The working copy is hostile: the repository's own commands run in it, possibly at the same time
as a tool, and may swap any folder for a symlink between two system calls. So no path is ever
checked and then used by name. A path is walked one component at a time from a descriptor of the
root, each folder opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to the previous one
(``dir_fd``), and the last component opened with ``O_NOFOLLOW`` relative to its folder. A symlink
met on the way is read (``readlink`` relative to its folder) and its target is walked the same
way, from descriptors already held, so a target is followed only while it stays inside; a swap
made after a component was opened cannot move the walk, and one made before is seen by the walk.

Only regular files are read or written: every open uses ``O_NONBLOCK`` and ``fstat`` decides, so
a FIFO, socket or device is an error at once. Reads stop at a limit, whatever the file's size.
Writes go to a fresh file in the same folder (``O_EXCL``) that is renamed over the target, so a
hard link is replaced, never written through, and a file's permission bits are kept.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MAX_LIST = 2000
MAX_READ_LINES = 2000
MAX_READ_BYTES = 256 * 1024
# read_file reads at most this much of a file; past it the file is shown cut, never read whole.
MAX_READ_FILE = 8 * 1024 * 1024
MAX_MATCHES = 200
MAX_SEARCH_FILE = 1024 * 1024
MAX_WRITE_BYTES = 2 * 1024 * 1024
MAX_SYMLINKS = 40  # as the kernel's own limit: a loop of links ends with an error, not a hang
MAX_DEPTH = 100  # folders deeper than this are not listed or searched (each level holds a descriptor)
SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules", ".mypy_cache", ".pytest_cache", ".ruff_cache"}

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_BINARY_PROBE = 8192
# Characters HFS+ ignores in names (as git's own checks do), so ".g\u200cit" is ".git" there.
_IGNORABLE = dict.fromkeys(
    [*range(0x200C, 0x2010), *range(0x202A, 0x202F), *range(0x206A, 0x2070), 0xFEFF],
)


class ToolError(Exception):
    """A refusal or failure the model can read and act on."""


def is_git_name(name: str) -> bool:
    """True for a name that is, or on some file system means, ``.git``: any letter case
    (``.GIT``, ``.Git``), HFS+-ignorable characters, NTFS trailing dots and spaces, ``git~1``."""
    plain = name.translate(_IGNORABLE).rstrip(" .").casefold()
    return plain in (".git", "git~1")


@dataclass
class _Location:
    """One entry of the working copy: its name inside the folder open as ``dir_fd``."""

    dir_fd: int
    name: str  # "." when the location is the folder itself
    rel: str  # the path relative to the root, symlinks resolved ("." for the root)


class _Descriptors:
    """Closes every descriptor opened while resolving and using one path."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def add(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def __enter__(self) -> _Descriptors:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in reversed(self._fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


@dataclass
class Workspace:
    root: Path
    changed: set[str] = field(default_factory=set)
    # Files written or edited that do not parse right now (path -> error); `finish` checks it.
    broken: dict[str, str] = field(default_factory=dict)
    # Kept paths (a slot's .venv): they outlive the task and serve the next one, so never written.
    protected: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._protected = [
            [part for part in keep.split("/") if part not in ("", ".")] for keep in self.protected if keep.strip("/.")
        ]
        self.root = Path(self.root)
        self._real_root = os.path.realpath(self.root)
        # An absolute symlink target may name the root either way.
        self._root_names = {self._real_root, os.path.abspath(self.root)}

    # --- confinement ----------------------------------------------------------------------------
    @staticmethod
    def _parts(path: str) -> list[str]:
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path must be a non-empty string")
        if "\x00" in path:
            raise ToolError("path contains a NUL character")
        try:
            path.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            raise ToolError("path is not valid Unicode text (a lone surrogate)") from None
        if os.path.isabs(path) or path.startswith("~"):
            raise ToolError(f"{path}: absolute paths are not allowed; use a path relative to the repository root")
        parts = [part for part in path.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise ToolError(f"{path}: '..' is not allowed; paths stay inside the repository")
        if any(is_git_name(part) for part in parts):
            raise ToolError(f"{path}: the .git folder is off limits")
        return parts

    def _locate(
        self,
        fds: _Descriptors,
        path: str,
        *,
        create_dirs: bool = False,
        follow_last: bool = True,
        writing: bool = False,
    ) -> _Location:
        """Walks ``path`` from the root without ever letting the kernel follow a symlink.

        Returns the folder (open, owned by ``fds``) holding the last component and its name; the
        last component itself is not opened. Symlinks in folders, and in the last component when
        ``follow_last``, are resolved here against descriptors already held, and refused when
        their target leaves the root or enters ``.git``. ``create_dirs`` makes missing folders
        (``mkdir`` relative to the parent's descriptor, then opened with ``O_NOFOLLOW``).
        """
        pending = list(reversed(self._parts(path)))
        folders = [fds.add(os.open(self._real_root, _ROOT_FLAGS))]
        names: list[str] = []
        links = 0
        created = 0
        while True:
            if not pending:  # the path (or a symlink's target) names a folder itself
                return _Location(folders[-1], ".", "/".join(names) or ".")
            name = pending.pop()
            if name == "..":  # only from a symlink's target; the user's own ".." is refused
                if not names:
                    raise ToolError(f"{path}: resolves outside the repository (through a symlink)")
                folders.pop()
                names.pop()
                continue
            if is_git_name(name):
                raise ToolError(f"{path}: the .git folder is off limits")
            if writing and self._is_protected([*names, name]):
                raise ToolError(f"{path}: kept between tasks (the repository's keep_paths); not writable")
            if not pending:
                target = self._link_target(folders[-1], name) if follow_last else None
                if target is None:
                    return _Location(folders[-1], name, "/".join([*names, name]))
            else:
                try:
                    fd = fds.add(os.open(name, _DIR_FLAGS, dir_fd=folders[-1]))
                except FileNotFoundError:
                    # A dangling symlink is "not found" too only when it is no link at all.
                    target = self._link_target(folders[-1], name)
                    if target is None:
                        if not create_dirs:
                            raise ToolError(f"{path}: no such file") from None
                        created += 1
                        if created > 20:  # someone keeps removing what we create
                            raise ToolError(f"{path}: the folder keeps changing; try again") from None
                        try:
                            os.mkdir(name, 0o777, dir_fd=folders[-1])
                        except FileExistsError:
                            pass
                        pending.append(name)  # open it on the next turn, again with O_NOFOLLOW
                        continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    target = self._link_target(folders[-1], name)
                    if target is None:
                        raise ToolError(f"{path}: {'/'.join([*names, name])} is not a folder") from None
                else:
                    folders.append(fd)
                    names.append(name)
                    continue
            # `name` is a symlink: walk its target from here (or from the root when absolute).
            links += 1
            if links > MAX_SYMLINKS:
                raise ToolError(f"{path}: too many levels of symlinks")
            if target.startswith("/"):
                inside = self._inside(target)
                if inside is None:
                    raise ToolError(f"{path}: resolves outside the repository (through a symlink)")
                del folders[1:]
                names.clear()
                target = inside
            pending.extend(reversed([part for part in target.split("/") if part not in ("", ".")]))

    def _is_protected(self, parts: list[str]) -> bool:
        return any(parts[: len(keep)] == keep for keep in self._protected if len(parts) >= len(keep))

    @staticmethod
    def _link_target(dir_fd: int, name: str) -> str | None:
        """The target of the symlink ``name`` in the folder, or None when it is not a symlink."""
        try:
            return os.readlink(name, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # exists, but is no symlink
                return None
            raise

    def _inside(self, target: str) -> str | None:
        for root in self._root_names:
            if target == root:
                return "."
            if target.startswith(root.rstrip("/") + "/"):
                return target[len(root.rstrip("/")) + 1 :]
        return None

    @staticmethod
    def _open_entry(fds: _Descriptors, loc: _Location, path: str) -> tuple[int, os.stat_result]:
        """Opens a folder or a regular file (``O_NOFOLLOW | O_NONBLOCK``, so neither a symlink
        swapped in since resolving nor a FIFO can hold it); refuses anything else at once."""
        try:
            fd = fds.add(os.open(loc.name, _FILE_FLAGS, dir_fd=loc.dir_fd))
        except FileNotFoundError:
            raise ToolError(f"{path}: no such file") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # became a symlink after it was resolved
                raise ToolError(f"{path}: changed while being opened; try again") from None
            if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP, errno.ENODEV):  # a socket or device
                raise ToolError(f"{path}: not a regular file (a socket or device)") from None
            raise
        info = os.fstat(fd)
        if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            raise ToolError(f"{path}: not a regular file ({_kind(info.st_mode)}); only regular files can be used")
        return fd, info

    def _open_regular(
        self, fds: _Descriptors, loc: _Location, path: str, *, folder_hint: str = ""
    ) -> tuple[int, os.stat_result]:
        fd, info = self._open_entry(fds, loc, path)
        if stat.S_ISDIR(info.st_mode):
            raise ToolError(f"{path}: is a folder{folder_hint}")
        return fd, info

    def _replace(self, loc: _Location, path: str, data: bytes) -> bool:
        """Writes ``data`` to a new file in the folder and renames it over the entry.

        Returns whether the entry existed. A hard link at the entry is replaced (the other
        names of its inode keep their content); a symlink there (swapped in after resolving) is
        replaced too, never followed. A regular file keeps its permission bits.
        """
        try:
            info = os.stat(loc.name, dir_fd=loc.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            info = None
        mode = None
        if info is not None:
            if stat.S_ISDIR(info.st_mode):
                raise ToolError(f"{path}: is a folder")
            if stat.S_ISREG(info.st_mode):
                mode = stat.S_IMODE(info.st_mode) & 0o777  # never carry set-id bits over
            elif not stat.S_ISLNK(info.st_mode):
                raise ToolError(f"{path}: not a regular file ({_kind(info.st_mode)}); only regular files can be used")
        for _ in range(10):
            temporary = f".agentrunner-tmp-{secrets.token_hex(8)}"
            try:
                fd = os.open(temporary, _TMP_FLAGS, 0o666, dir_fd=loc.dir_fd)
                break
            except FileExistsError:
                continue
        else:
            raise ToolError(f"{path}: could not create a temporary file next to it")
        try:
            try:
                if mode is not None:
                    os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(temporary, loc.name, src_dir_fd=loc.dir_fd, dst_dir_fd=loc.dir_fd)
        except BaseException as exc:
            try:
                os.unlink(temporary, dir_fd=loc.dir_fd)
            except OSError:
                pass
            if isinstance(exc, IsADirectoryError):
                raise ToolError(f"{path}: is a folder") from None
            raise
        return info is not None

    def _walk(self, dir_fd: int, prefix: str, depth: int = 0) -> Iterator[tuple[str, str, int, str]]:
        """Yields (kind, path, folder fd, name) for every entry under the folder, files of a
        folder first, then its subfolders, each sorted. Kinds: ``file``, ``link``, ``other``.
        Subfolders are opened with ``O_NOFOLLOW`` relative to their parent; symlinks are yielded,
        never entered; ``.git`` (any case) and SKIP_DIRS are left out."""
        files: list[tuple[str, str]] = []
        folders: list[str] = []
        try:
            # Every kind is decided while the scan (and its descriptor) is open: d_type, or an
            # lstat relative to the scanned folder, never a lookup by path.
            with os.scandir(dir_fd) as scan:
                for entry in scan:
                    name = entry.name
                    if is_git_name(name):
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if name not in SKIP_DIRS:
                                folders.append(name)
                        elif entry.is_symlink():
                            files.append((name, "link"))
                        else:
                            files.append((name, "file" if entry.is_file(follow_symlinks=False) else "other"))
                    except OSError:
                        continue
        except OSError:
            return
        for name, kind in sorted(files):
            yield kind, f"{prefix}{name}", dir_fd, name
        folders.sort()
        if depth >= MAX_DEPTH:
            return
        for name in folders:
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError:  # swapped for a symlink, removed or unreadable since the scan
                continue
            try:
                yield from self._walk(sub, f"{prefix}{name}/", depth + 1)
            finally:
                os.close(sub)

    # --- tools ----------------------------------------------------------------------------------
    def list_files(self, path: str = ".") -> str:
        with _Descriptors() as fds:
            loc = self._locate(fds, path or ".")
            folder, info = self._open_entry(fds, loc, path)
            if not stat.S_ISDIR(info.st_mode):
                raise ToolError(f"{path}: not a folder")
            prefix = "" if loc.rel == "." else f"{loc.rel}/"
            found: list[str] = []
            walk = self._walk(folder, prefix)
            try:
                for kind, rel, dir_fd, name in walk:
                    if kind == "link":
                        try:
                            target = os.readlink(name, dir_fd=dir_fd)
                        except OSError:
                            target = "?"
                        found.append(f"{_show(rel)} -> {_show(target[:200])} (symlink)")
                    elif kind == "other":
                        found.append(f"{_show(rel)} (not a regular file)")
                    else:
                        found.append(_show(rel))
                    if len(found) >= MAX_LIST:
                        return "\n".join(found) + f"\n… (stopped at {MAX_LIST} files; list a subfolder)"
            finally:
                walk.close()
        return "\n".join(found) if found else "(no files)"

    def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        start = _line_number("start_line", start_line, 1)
        if end_line is not None and _line_number("end_line", end_line, start) < start:
            raise ToolError(f"end_line {end_line} is before start_line {start}")
        with _Descriptors() as fds:
            loc = self._locate(fds, path)
            fd, info = self._open_regular(fds, loc, path, folder_hint="; use list_files")
            head = _read_at_most(fd, _BINARY_PROBE)
            if b"\x00" in head:
                raise ToolError(f"{path}: binary file ({info.st_size} bytes)")
            data = head + _read_at_most(fd, MAX_READ_FILE - len(head)) if len(head) == _BINARY_PROBE else head
            cut = len(data) >= MAX_READ_FILE and bool(_read_at_most(fd, 1))
        total = _count_lines(data)
        end = min(total, _line_number("end_line", end_line, total), start + MAX_READ_LINES - 1)
        if start > max(1, total):
            raise ToolError(f"{path}: has {total} lines; start_line {start} is past the end")
        out, size = [], 0
        offset = _line_offset(data, start)
        number = start
        while number <= end:
            stop = data.find(b"\n", offset)
            raw = data[offset:] if stop < 0 else data[offset:stop]
            offset = len(data) if stop < 0 else stop + 1
            text = raw.decode("utf-8", errors="replace").removesuffix("\r")
            line = f"{number:>5}| {text}"
            size += len(line) + 1
            if size > MAX_READ_BYTES:
                if not out:  # one line longer than the whole budget: show its start
                    out.append(line[:MAX_READ_BYTES])
                    out.append(f"… (line {number} cut at {MAX_READ_BYTES} bytes)")
                    number += 1
                    if number <= total:
                        out.append(f"… (read from line {number})")
                else:
                    out.append(f"… (cut at {MAX_READ_BYTES} bytes; read from line {number})")
                break
            out.append(line)
            number += 1
        else:
            if end < total:
                out.append(f"… ({total - end} more lines; read from line {end + 1})")
        if cut:
            out.append(
                f"… (the file is {info.st_size} bytes; read_file reads only its first {MAX_READ_FILE} bytes, "
                f"{total} lines)"
            )
        return "\n".join(out) if out else "(empty file)"

    def search_code(self, pattern: str, path: str = ".") -> str:
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ToolError(f"invalid regular expression: {exc}") from None
        matches: list[str] = []

        def search(fd: int, rel: str) -> bool:
            """Adds the file's matching lines; False once the cap is reached."""
            data = _read_at_most(fd, MAX_SEARCH_FILE + 1)
            if len(data) > MAX_SEARCH_FILE or b"\x00" in data[:_BINARY_PROBE]:
                return True
            for number, line in enumerate(_split_lines(data.decode("utf-8", errors="replace")), 1):
                if regex.search(line):
                    matches.append(f"{_show(rel)}:{number}: {line[:300]}")
                    if len(matches) >= MAX_MATCHES:
                        return False
            return True

        with _Descriptors() as fds:
            loc = self._locate(fds, path or ".")
            fd, info = self._open_entry(fds, loc, path)
            if not stat.S_ISDIR(info.st_mode):
                search(fd, loc.rel)
            else:
                prefix = "" if loc.rel == "." else f"{loc.rel}/"
                walk = self._walk(fd, prefix)
                try:
                    for kind, rel, dir_fd, name in walk:
                        if kind != "file":  # symlinks and special files are never read through
                            continue
                        keep_going = self._search_one(dir_fd, name, rel, search)
                        if not keep_going:
                            break
                finally:
                    walk.close()
        if len(matches) >= MAX_MATCHES:
            return "\n".join(matches) + f"\n… (stopped at {MAX_MATCHES} matches; narrow the pattern or path)"
        return "\n".join(matches) if matches else "no matches"

    @staticmethod
    def _search_one(dir_fd: int, name: str, rel: str, search: Callable[[int, str], bool]) -> bool:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError:  # swapped for a symlink or removed since the scan: skip it
            return True
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SEARCH_FILE:
                return True
            return search(fd, rel)
        except OSError:
            return True
        finally:
            os.close(fd)

    def write_file(self, path: str, content: str) -> str:
        if not isinstance(content, str):
            raise ToolError("content must be a string")
        data = _encode(content, "content")
        if len(data) > MAX_WRITE_BYTES:
            raise ToolError(f"content larger than {MAX_WRITE_BYTES} bytes")
        with _Descriptors() as fds:
            loc = self._locate(fds, path, create_dirs=True, writing=True)
            if loc.name == ".":
                raise ToolError(f"{path}: is a folder")
            existed = self._replace(loc, path, data)
        return self._after_change(
            loc.rel, data, f"{'overwrote' if existed else 'created'} {path} ({len(content)} characters)"
        )

    def edit_file(self, path: str, old_text: str, new_text: str) -> str:
        if not isinstance(old_text, str) or not isinstance(new_text, str) or old_text == "":
            raise ToolError("old_text must be a non-empty string and new_text a string")
        _encode(old_text, "old_text")
        _encode(new_text, "new_text")
        with _Descriptors() as fds:
            loc = self._locate(fds, path, writing=True)
            fd, info = self._open_regular(fds, loc, path)
            data = _read_at_most(fd, MAX_WRITE_BYTES + 1)
            if len(data) > MAX_WRITE_BYTES:
                raise ToolError(f"{path}: too large for edit_file ({info.st_size} bytes; at most {MAX_WRITE_BYTES})")
            # surrogateescape keeps bytes that are not UTF-8 exactly as they were.
            text = data.decode("utf-8", errors="surrogateescape")
            count = text.count(old_text)
            if count == 0:
                shown = data.decode("utf-8", errors="replace")
                raise ToolError(f"{path}: old_text was not found. {self._nearest(shown, old_text)}")
            if count > 1:
                lines = [text[: m.start()].count("\n") + 1 for m in re.finditer(re.escape(old_text), text)]
                raise ToolError(
                    f"{path}: old_text occurs {count} times (lines {', '.join(map(str, lines[:20]))}); "
                    "include more surrounding lines so it matches exactly once"
                )
            new_data = _encode(text.replace(old_text, new_text, 1), "new_text")
            if len(new_data) > MAX_WRITE_BYTES:
                raise ToolError(f"{path}: the edited file would be larger than {MAX_WRITE_BYTES} bytes")
            self._replace(loc, path, new_data)
        return self._after_change(loc.rel, new_data, f"edited {path}")

    def delete_file(self, path: str) -> str:
        """Deletes one entry; a symlink is removed itself, its target is left alone."""
        with _Descriptors() as fds:
            loc = self._locate(fds, path, follow_last=False, writing=True)
            try:
                info = os.stat(loc.name, dir_fd=loc.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise ToolError(f"{path}: no such file") from None
            if loc.name == "." or stat.S_ISDIR(info.st_mode):
                raise ToolError(f"{path}: is a folder; delete its files one by one")
            try:
                os.unlink(loc.name, dir_fd=loc.dir_fd)
            except FileNotFoundError:
                raise ToolError(f"{path}: no such file") from None
            except IsADirectoryError:
                raise ToolError(f"{path}: is a folder; delete its files one by one") from None
        self.changed.add(loc.rel)
        self.broken.pop(loc.rel, None)
        return f"deleted {path}"

    # --- helpers --------------------------------------------------------------------------------
    def _after_change(self, rel: str, data: bytes, message: str) -> str:
        self.changed.add(rel)
        problem = check_syntax(rel, data)
        if problem:
            self.broken[rel] = problem
            return f"{message}, but it does not parse: {problem}. Fix it before finishing."
        self.broken.pop(rel, None)
        return message

    @staticmethod
    def _nearest(text: str, wanted: str) -> str:
        lines = _split_lines(text)  # numbered as read_file numbers them
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


def check_syntax(name: str, data: bytes) -> str | None:
    """Python, JSON and TOML files must parse; returns the problem or None. Checks the bytes just
    written, never the file by name (which could have been swapped since)."""
    suffix = Path(name).suffix.lower()
    try:
        if suffix == ".py":
            compile(data, Path(name).name, "exec", dont_inherit=True)
        elif suffix == ".json":
            json.loads(data.decode("utf-8"))
        elif suffix == ".toml":
            tomllib.loads(data.decode("utf-8"))
    except SyntaxError as exc:
        return f"SyntaxError at line {exc.lineno}: {exc.msg}"
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0:
        chunk = os.read(fd, min(left, 1024 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _count_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _line_offset(data: bytes, line: int) -> int:
    """The offset where 1-based ``line`` starts; counts newlines in C-speed chunks first."""
    need, offset, chunk = line - 1, 0, 1 << 16
    while need > 0:
        count = data.count(b"\n", offset, offset + chunk)
        if count < need:
            need -= count
            offset += chunk
            if offset >= len(data):
                return len(data)
            continue
        for _ in range(need):
            offset = data.index(b"\n", offset) + 1
        break
    return offset


def _split_lines(text: str) -> list[str]:
    """Lines as editors and tracebacks count them: split at "\\n" only (CRLF's "\\r" dropped)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _line_number(name: str, value: object, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ToolError(f"{name} must be a whole number")
    try:
        number = int(value)
    except ValueError:
        raise ToolError(f"{name} must be a whole number") from None
    return max(1, number) if number else default


def _encode(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        raise ToolError(f"{what} is not valid Unicode text (a lone surrogate)") from None


def _show(name: str) -> str:
    """A file name as one printable line: control characters and undecodable bytes escaped."""
    if name.isprintable():
        return name
    return "".join(
        c if c.isprintable() else "".join(f"\\x{byte:02x}" for byte in c.encode("utf-8", "surrogateescape"))
        for c in name
    )


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "not a regular file"


TestRunner = Callable[[list[str]], tuple[int | None, str]]
