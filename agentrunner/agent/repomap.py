"""The repository map of an agent's first message, and what spares reading every folder again.

A runner maps the same working copies task after task, and a reset changes few of their folders.
Each folder's listing is kept with the folder's own stat (device, inode, mtime, ctime); the next
map of the same tree stats the folder and reads it again only when that changed, as git's
untracked cache does. Adding, removing or renaming an entry changes the folder's ctime, which no
process can set back; what a symbolic link points to is checked on every map, since the link's
folder does not change when its target does. A folder changed within ``RACY_NS`` of a map is not
kept (file times tick coarsely: a change in the same tick as the stat would not show), so it is
read again next time.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from agentrunner.agent.workspace import SKIP_DIRS, Workspace, is_git_name

RACY_NS = 1_000_000_000
# Folder listings kept over all trees (about 500 bytes each, some 25 MB at most): a runner's slots of
# Django's size (2,500 folders) take 20 trees. The least recently mapped trees go first.
CACHED_FOLDERS = 50_000


@dataclass(frozen=True, slots=True)
class _Listing:
    stat: tuple[int, int, int, int]  # the folder's device, inode, mtime, ctime when it was read
    names: str  # files, and anything else that is neither a folder nor a link, "\0"-separated
    folders: tuple[str, ...]  # sub-folders to enter (no links, no skipped folders, no .git), sorted
    links: str  # symbolic links, "\0"-separated: listed unless they point to a folder, checked each time


_lock = threading.Lock()
_trees: OrderedDict[str, dict[str, _Listing]] = OrderedDict()  # root -> folder (relative) -> listing
_kept_folders = 0


def repository_map(workspace: Workspace, limit: int = 200) -> str:
    """The first ``limit`` files in the order of a top-down ``os.walk`` (a folder's files, sorted,
    before its sub-folders', each sorted) and how many there are. Symbolic links to folders are
    neither listed nor followed; .git under any spelling and the folders of SKIP_DIRS are left out.

    Every file is counted, only the first ``limit`` get a path built."""
    global _kept_folders
    root = os.fspath(workspace.root)
    with _lock:
        known = _trees.get(root, {})
    kept: dict[str, _Listing] = {}
    started = time.time_ns()
    shown: list[str] = []
    count = 0
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        listing = _listing(folder, known.get(prefix), top=not prefix)
        if listing is None:  # as os.walk: a folder that cannot be read is left out
            continue
        if max(listing.stat[2], listing.stat[3]) < started - RACY_NS:
            kept[prefix] = listing
        names = listing.names.split("\0") if listing.names else []
        if listing.links:
            names += [link for link in listing.links.split("\0") if not os.path.isdir(os.path.join(folder, link))]
        count += len(names)
        if len(shown) < limit:
            shown.extend(prefix + name for name in sorted(names)[: limit - len(shown)])
        stack.extend((os.path.join(folder, name), f"{prefix}{name}{os.sep}") for name in reversed(listing.folders))
    with _lock:
        _kept_folders -= len(_trees.pop(root, {}))
        if len(kept) <= CACHED_FOLDERS:  # kept as the most recent tree
            _trees[root] = kept
            _kept_folders += len(kept)
        while _kept_folders > CACHED_FOLDERS:
            _kept_folders -= len(_trees.popitem(last=False)[1])
    more = f"\n… and {count - limit} more files" if count > limit else ""
    return f"Repository files ({count}):\n" + "\n".join(shown) + more


def _listing(folder: str, cached: _Listing | None, *, top: bool) -> _Listing | None:
    """The folder's entries: the cached ones when the folder did not change, else read now. Its
    stat is taken before it is read, so a change made while it is read shows next time."""
    try:
        info = os.stat(folder, follow_symlinks=top)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode):  # turned into a link since its parent was read: not entered
        return None
    key = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns)
    if cached is not None and cached.stat == key:
        return cached
    try:
        with os.scandir(folder) as entries:
            read = list(entries)
    except OSError:
        return None
    names, folders, links = [], [], []
    for entry in read:
        if is_git_name(entry.name):  # never listed, never entered, as a file, folder or link
            continue
        try:
            is_link = entry.is_symlink()
        except OSError:
            is_link = False
        if is_link:
            links.append(entry.name)
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            names.append(entry.name)
        elif entry.name not in SKIP_DIRS:
            folders.append(entry.name)
    return _Listing(key, "\0".join(names), tuple(sorted(folders)), "\0".join(links))


def forget() -> None:
    """Drop every kept listing (tests; a runner never needs to)."""
    global _kept_folders
    with _lock:
        _trees.clear()
        _kept_folders = 0
