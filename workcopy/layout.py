"""Where a slot's working copy lives under a pool root.

The server's own pool (the in-process runners) keeps ``<pool root>/<repository>/<index>``. A runner
host keeps ``<pool root>/@<host>/<repository>/<index>``: its name is part of the path, so two
runners that share one data folder (an in-process runner and a remote one on the server's machine,
or two runner hosts) never work in each other's copies. ``@`` is in no repository or host name, so
the two layouts cannot meet."""

from __future__ import annotations


def remote_slot_path(host: str, repository_name: str, index: int) -> str:
    """A runner host's slot, relative to that host's pool root."""
    if not host or "/" in host or host in (".", ".."):
        raise ValueError(f"not a host name for a folder: {host!r}")
    return f"@{host}/{repository_name}/{int(index)}"
