"""Which repository URLs Agent Runner hands to git: the one place ``url`` and ``push_url`` are checked.

A URL reaches git's command line (clone, ls-remote, push), so anything git could read as an option
or as a transport that runs a program is refused before git starts:

- ``https://``, ``ssh://``, scp-like ``[user@]host:path`` and ``git://`` URLs, written in plain
  printable ASCII, with a host that cannot be read as an option and no password (it would be
  stored and shown wherever the URL is: API, admin, events).
- Plain ``http://`` is refused: https serves every hosting service, and plain text lets anyone on
  the path swap the code the pool checks out and read what the URL carries.
- Local paths and ``file://`` URLs only under ``AGENTRUNNER_LOCAL_REPO_ROOTS`` (``workcopy.config``), resolved
  first (``..`` and symlinks cannot leave a root); ``None`` there means every local path (the
  laptop default when DEBUG is on). The slot pool itself is never a valid origin: hostile code
  writes there.
- Never: a leading ``-``, remote helpers (``ext::``, ``fd::``, any ``<transport>::address``) or
  other schemes, control or invisible characters, leading or trailing whitespace.

The settings are read at call time, so a change of roots applies at once (and tests can set them).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from common.errors import DomainError
from workcopy import config

ALLOWED_SCHEMES = ("https", "ssh", "git", "file")

_HELPER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+.-]*::")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\])$")
_USER = re.compile(r"^[A-Za-z0-9_~.+][A-Za-z0-9_~.+%-]*$")
_SCP = re.compile(r"^(?:(?P<user>[^@/:]*)@)?(?P<host>\[[^\]/]*\]|[^:/\[\]@]*):(?P<path>.*)$", re.DOTALL)


class UrlRefused(DomainError):
    code = "url_refused"


def check_repository_url(url: object, *, field: str = "url", extra_roots: Iterable[str | Path] = ()) -> str:
    """The URL to store and give git, or UrlRefused naming ``field`` and the reason.

    A local path comes back resolved (absolute, symlinks followed), a ``file://`` URL as
    ``file://`` and its resolved path; every other URL as given. ``extra_roots`` are folders
    allowed besides the configured ones (the results repositories Agent Runner owns).
    """

    def refuse(reason: str) -> UrlRefused:
        return UrlRefused(reason, field=field)

    if not isinstance(url, str) or not url:
        raise refuse("Give a repository URL or path.")
    if len(url) > 1000:
        raise refuse("At most 1000 characters.")
    bad = next((c for c in url if _is_control(c)), None)
    if bad is not None:
        raise refuse(f"Control or invisible characters are not allowed (found U+{ord(bad):04X}).")
    if url != url.strip():
        raise refuse("Leading or trailing whitespace is not allowed.")
    if url.startswith("-"):
        raise refuse("A URL must not start with '-' (git would read it as an option).")
    if _HELPER.match(url):
        raise refuse("Remote helper transports ('<transport>::address', such as ext::) are not allowed.")

    scheme_match = _SCHEME.match(url)
    if scheme_match:
        scheme = scheme_match.group(1).lower()
        rest = url[scheme_match.end() :]
        if scheme == "file":
            return "file://" + _check_local(_file_url_path(rest, refuse), refuse, extra_roots)
        if scheme == "http":
            raise refuse("Plain http is not allowed (no integrity, credentials in clear): use https or ssh.")
        if scheme not in ALLOWED_SCHEMES:
            raise refuse(f"Scheme {scheme!r} is not allowed; use one of: https, ssh, git, or a local path.")
        _check_network_url(rest, refuse)
        return url

    if _is_local_path(url):
        return _check_local(url, refuse, extra_roots)
    scp = _SCP.match(url)
    if not scp:
        raise refuse("Not a URL git reads safely: use https://, ssh://, git://, user@host:path or a local path.")
    _check_user(scp.group("user"), refuse)
    _check_host(scp.group("host"), refuse)
    _check_remote_path(scp.group("path"), refuse)
    return url


def _is_control(char: str) -> bool:
    if char == " ":
        return False
    category = unicodedata.category(char)
    # Cc: ASCII controls, NUL, DEL; Cf: invisible format marks (bidi overrides, zero width);
    # Z*: every space or separator other than the plain space.
    return category in ("Cc", "Cf", "Co", "Cs", "Zl", "Zp", "Zs") or char.isspace()


def _is_local_path(url: str) -> bool:
    """git's own rule: no colon, or a slash before the first colon, means a local path."""
    colon = url.find(":")
    slash = url.find("/")
    return colon < 0 or (0 <= slash < colon)


def _file_url_path(rest: str, refuse) -> str:
    authority, slash, path = rest.partition("/")
    if not slash or authority not in ("", "localhost"):
        raise refuse("A file:// URL names a path on this machine: file:///absolute/path.")
    if any(c in path for c in "%?#"):
        raise refuse("A file:// URL must not contain '%', '?' or '#'.")
    return "/" + path


def _check_local(path: str, refuse, extra_roots: Iterable[str | Path]) -> str:
    resolved = os.path.realpath(path)
    current = config.current()
    pool = os.path.realpath(current.pool_root)
    if _inside(resolved, pool):
        raise refuse("The slot pool is not a valid origin (code under test writes there).")
    roots = current.local_repo_roots
    extra = [os.path.realpath(root) for root in extra_roots]
    if any(_inside(resolved, root) for root in extra):
        return resolved
    if roots is None:
        return resolved
    allowed = [os.path.realpath(root) for root in roots]
    if not any(_inside(resolved, root) for root in allowed):
        where = ", ".join(allowed) if allowed else "none configured"
        raise refuse(f"Local paths must be under AGENTRUNNER_LOCAL_REPO_ROOTS ({where}); this one resolves outside.")
    return resolved


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_network_url(rest: str, refuse) -> None:
    if not all(33 <= ord(c) <= 126 for c in rest):
        raise refuse("A URL must be printable ASCII without spaces (percent-encode the rest).")
    authority, slash, path = rest.partition("/")
    if not slash:
        raise refuse("The URL names no repository path.")
    user, at, hostport = authority.rpartition("@")
    if at:
        _check_user(user, refuse)
    host, port = hostport, ""
    if hostport.startswith("["):
        end = hostport.find("]")
        host, port = hostport[: end + 1], hostport[end + 1 :]
    elif ":" in hostport:
        host, _, port = hostport.partition(":")
        port = ":" + port
    _check_host(host, refuse)
    if port and not re.fullmatch(r":[0-9]{1,5}", port):
        raise refuse("The port must be a number.")
    _check_remote_path("/" + path, refuse)


def _check_user(user: str | None, refuse) -> None:
    if user is None:
        return
    if ":" in user:
        raise refuse("Credentials in the URL are not allowed (they would be stored and shown); use ssh keys.")
    if not _USER.match(user):
        raise refuse("Invalid user name in the URL.")


def _check_host(host: str, refuse) -> None:
    if not host:
        raise refuse("The URL names no host.")
    if not _HOST.match(host) or host.startswith("-"):
        raise refuse("Invalid host name (letters, digits, '.', '-', '_' or an [IPv6] address; no leading '-').")


def _check_remote_path(path: str, refuse) -> None:
    if not all(33 <= ord(c) <= 126 for c in path):
        raise refuse("A URL must be printable ASCII without spaces (percent-encode the rest).")
    bare = path.lstrip("/")
    if not bare:
        raise refuse("The URL names no repository path.")
    if path.startswith("-") or bare.startswith("-"):
        raise refuse("The repository path must not start with '-'.")
