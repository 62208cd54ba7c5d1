"""Every write to the repo pool: repositories, and the server host's own pool of slots.

The slot functions here (allocate, release, warm, force release, reap) compose the bookkeeping
(``repopool.bookkeeping``: rows, leases, fencing, database only) with the working copies
(``workcopy.slots``: git, setup, disk, no database) on the server's own host. A remote runner host
does the ``workcopy`` half itself and reaches the bookkeeping through the runner API.

Invariants:
- No git work runs inside a transaction or row lock: the state change commits first, the git
  work follows, the outcome is recorded after.
- ``lease_token`` is the fencing token, new for every lease: renew and release must present it,
  so a runner whose lease expired (and was reaped, maybe re-leased) can never touch the slot.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from repopool import bookkeeping
from repopool.bookkeeping import (  # noqa: F401  (the remote hosts' half, served by the runner API)
    slot_lease,
    slot_prepared,
    slot_release_remote,
    slots_reap_remote,
)
from repopool.errors import NoSlotAvailable, RefNotFound, RepositoryNotFound
from repopool.models import Repository, Slot, SlotState
from repopool.urls_policy import check_repository_url
from workcopy import git, slots

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = bookkeeping.DEFAULT_LEASE_SECONDS
# What may name a repository in a filter: an id in ASCII digits or a well-formed repository name.
REPOSITORY_REF_REGEX = r"^(?:[0-9]{1,18}|(?!\.{1,2}\Z)[A-Za-z0-9._-]{1,100})\Z"
REPOSITORY_REF_HELP = "Give a repository id (digits 0-9) or name (letters, digits, '-', '_', '.')."
St = SlotState


@dataclass(frozen=True)
class Lease:
    slot_id: int
    path: Path
    lease_token: uuid.UUID
    lease_expires_at: datetime
    commit: str


def host() -> str:
    return settings.AGENTRUNNER_HOST


def slot_path(repository: Repository, index: int) -> Path:
    return Path(settings.REPO_POOL_ROOT) / repository.name / str(index)


# --- repositories -------------------------------------------------------------------------------
def repository_get(*, ref: int | str) -> Repository:
    repo = None
    # ASCII digits only: str.isdigit() is also true for "²" (int() refuses it) and "١٢" (int() reads
    # it as 12, so a name would silently select another repository by id).
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isascii() and ref.isdigit()):
        repo = Repository.objects.filter(pk=int(ref)).first()
    if repo is None:
        repo = Repository.objects.filter(name=str(ref)).first()
    if repo is None:
        raise RepositoryNotFound(f"unknown repository {ref!r}")
    return repo


def repository_create(
    *,
    name: str,
    url: str,
    default_branch: str = "",
    pool_size: int = 2,
    setup_command: str = "",
    setup_watch_files: list[str] | None = None,
    test_command: str = "",
    keep_paths: list[str] | None = None,
    push_url: str = "",
    allow_test_command_override: bool = False,
    setup_network: bool = True,
    test_network: bool = False,
    rerun_final_tests: bool = False,
    verify: bool = True,
) -> Repository:
    """Register a repository. ``url`` and ``push_url`` must pass ``urls_policy`` (refused with a
    DomainError naming the field, before git runs). With ``verify``, the URL must answer as a git
    repository, and an empty default branch is read from it."""
    url = check_repository_url(url, field="url")
    if push_url:
        push_url = check_repository_url(push_url, field="push_url")
    if verify:
        default_branch = default_branch or _remote_default_branch(url)
    repo = Repository(
        name=name,
        url=url,
        default_branch=default_branch or "main",
        pool_size=pool_size,
        setup_command=setup_command,
        setup_watch_files=setup_watch_files or [],
        test_command=test_command or Repository._meta.get_field("test_command").default,
        keep_paths=keep_paths or [],
        push_url=push_url,
        allow_test_command_override=allow_test_command_override,
        setup_network=setup_network,
        test_network=test_network,
        rerun_final_tests=rerun_final_tests,
    )
    repo.full_clean()
    repo.save()
    return repo


def repository_update(*, repository: Repository, **fields) -> Repository:
    """Change a repository's settings; a new URL must pass ``urls_policy`` and answer as a git
    repository, a new push_url must pass ``urls_policy``."""
    if "url" in fields:
        fields["url"] = check_repository_url(fields["url"], field="url")
        if fields["url"] != repository.url:
            _remote_default_branch(fields["url"])
    if fields.get("push_url"):
        fields["push_url"] = check_repository_url(fields["push_url"], field="push_url")
    for name, value in fields.items():
        setattr(repository, name, value)
    repository.full_clean()
    repository.save()
    return repository


def _remote_default_branch(url: str) -> str:
    try:
        return git.remote_head(url)
    except git.UrlNotAllowed:
        raise  # the policy's own reason, not "unreachable"
    except git.GitError as exc:
        # The URL passed the policy (no credentials, no control characters): safe to echo.
        raise git.GitError(f"{url!r} is not a reachable git repository: {exc.message}", field="url") from None


def repository_find_or_create_for_url(*, url: str, name: str = "", test_command: str = "") -> Repository:
    """The repository registered under that name or for ``url`` (checked by ``urls_policy``; a
    local path is made absolute and resolved), created if new."""
    named = Repository.objects.filter(name=url).first()
    if named is not None:
        return named
    url = check_repository_url(url, field="url")
    existing = Repository.objects.filter(url=url).first()
    if existing:
        return existing
    base = name or Path(url.rstrip("/")).name.removesuffix(".git") or "repo"
    base = "".join(c if c.isalnum() or c in "-_." else "-" for c in base).strip(".") or "repo"
    candidate, n = base, 1
    while Repository.objects.filter(name=candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return repository_create(name=candidate, url=url, test_command=test_command)


# --- the server host's own pool: bookkeeping + working copies ------------------------------------
def repo_spec(repository: Repository) -> slots.RepoSpec:
    """What a host needs to know of ``repository`` to keep working copies of it."""
    return slots.RepoSpec(
        name=repository.name,
        url=repository.url,
        default_branch=repository.default_branch,
        keep_paths=list(repository.keep_paths),
        setup_command=repository.setup_command,
        setup_watch_files=list(repository.setup_watch_files),
        setup_network=repository.setup_network,
        setup_timeout=settings.REPO_POOL_SETUP_TIMEOUT,
    )


def slot_seen(slot: Slot, *, pool_root: Path | None = None) -> slots.SlotSeen:
    """What the bookkeeping says of ``slot``, for the host that prepares it (a relative path is
    under that host's ``pool_root``)."""
    path = Path(slot.path)
    if not path.is_absolute():
        path = Path(pool_root or settings.REPO_POOL_ROOT) / path
    return slots.SlotSeen(
        path=path,
        commit=slot.commit,
        base_commit=slot.base_commit,
        setup_hash=slot.setup_hash,
        fetched_at=slot.fetched_at.timestamp() if slot.fetched_at else None,
        needs_reset=slot.needs_reset,
    )


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"


def pool_warm(*, repository: Repository) -> list[Slot]:
    """Bring the pool of this host up to ``pool_size`` ready slots; re-clone broken ones.

    A slot whose clone or setup fails ends ``broken`` with the error kept; the others go on.
    """
    to_prepare: list[Slot] = []
    for slot in Slot.objects.filter(repository=repository, host=host(), state=St.BROKEN):
        if Slot.objects.filter(pk=slot.pk, state=St.BROKEN).update(state=St.CLONING, state_changed_at=timezone.now()):
            to_prepare.append(slot)
    while True:
        slot = bookkeeping.slot_create_row(repository, host=host(), capacity=repository.pool_size)
        if slot is None:
            break
        to_prepare.append(slot)
    for slot in to_prepare:
        _clone_into(slot, repository, final_state=St.FREE)
    return list(Slot.objects.filter(repository=repository, host=host()).order_by("index"))


def pool_warm_request(*, repository: Repository) -> Repository:
    """Ask for the pool to be warmed by a worker, not here: warming clones and runs the
    repository's setup command, which must never run inside a web request.

    With a broker a Celery job is enqueued after commit; without one the request waits for a
    runner host (``runagent --loop`` when idle, or ``manage.py warm_pool --pending``)."""
    now = timezone.now()
    Repository.objects.filter(pk=repository.pk).update(warm_requested_at=now)
    repository.warm_requested_at = now
    if settings.CELERY_BROKER_URL:
        from repopool.tasks import warm_requested

        repo_id = repository.pk
        transaction.on_commit(lambda: warm_requested.delay(repo_id))
    return repository


def pool_warm_requested(*, repository_id: int | None = None) -> list[Repository]:
    """Warm every repository (or the one named) whose warm was requested; returns those warmed.

    Each request is taken with a conditional UPDATE, so two workers never warm the same one twice
    for one request."""
    pending = Repository.objects.filter(warm_requested_at__isnull=False)
    if repository_id is not None:
        pending = pending.filter(pk=repository_id)
    warmed = []
    for repo in pending:
        if not Repository.objects.filter(pk=repo.pk, warm_requested_at=repo.warm_requested_at).update(
            warm_requested_at=None
        ):
            continue  # another worker took it
        pool_warm(repository=repo)
        warmed.append(repo)
    return warmed


def _clone_into(slot: Slot, repository: Repository, *, final_state: str, **final_fields) -> bool:
    """Make the slot's copy from scratch (no transaction open: git and setup run here)."""
    try:
        made = slots.clone_base(repo_spec(repository), Path(slot.path))
    except Exception as exc:  # any failure of clone or setup leaves the slot broken, with why
        log.warning("slot %s broken: %s", slot.pk, _message(exc))
        bookkeeping.slot_mark_broken_row(slot.pk, _message(exc))
        return False
    bookkeeping.slot_record_clone(
        slot.pk, commit=made.commit, setup_hash=made.setup_hash, final_state=final_state, **final_fields
    )
    return True


# --- leasing ------------------------------------------------------------------------------------
def slot_allocate(
    *,
    repository: Repository,
    holder: str,
    lease_seconds: int = 3600,
    wait_seconds: float = 0,
    ref: str = "",
    fetch: bool = True,
) -> Lease:
    """Lease a clean slot of this host checked out at ``ref`` (default branch when empty).

    The bookkeeping leases a row (``bookkeeping.slot_lease``), the copy is made ready here
    (``workcopy.slots.prepare``: clone, reset, fetch, checkout, setup, outside any transaction),
    and the result is recorded (``bookkeeping.slot_prepared``). With ``fetch`` a branch name is
    fetched from origin first, so the lease starts from its latest commit; a commit id already
    present needs no fetch (the fastest allocation).

    Grows the pool on demand up to ``pool_size``; waits up to ``wait_seconds`` for a slot to free
    up, then raises NoSlotAvailable. A slot found corrupted on disk is marked broken and another
    one is tried. A ref that does not exist is refused (the slot goes back to the pool).
    """
    bookkeeping.validate_lease_seconds(lease_seconds)
    bookkeeping.validate_wait_seconds(wait_seconds)
    spec = repo_spec(repository)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            slot = bookkeeping.slot_lease(
                repository=repository, host=host(), holder=holder, lease_seconds=lease_seconds,
                wait_seconds=max(0.0, deadline - time.monotonic()), capacity=repository.pool_size,
            )  # fmt: skip
        except NoSlotAvailable:
            raise NoSlotAvailable(
                f"no slot of {repository.name} became free within {wait_seconds:g}s "
                f"(pool size {repository.pool_size} on {host()})"
            ) from None
        try:
            ready = slots.prepare(spec, slot_seen(slot), ref, fetch_ttl=settings.REPO_POOL_FETCH_TTL, fetch=fetch)
        except RefNotFound:
            # The copy is fine (a new one stays unrecorded: the next lease clones it again).
            bookkeeping.slot_return_unchanged(slot_id=slot.pk, token=slot.lease_token)
            raise
        except Exception as exc:  # the slot's copy is damaged: take it out, try another
            bookkeeping.slot_mark_broken_row(slot.pk, _message(exc), token=slot.lease_token)
            log.warning("slot %s broken at allocation: %s", slot.pk, _message(exc))
            continue
        slot = bookkeeping.slot_prepared(
            slot_id=slot.pk, token=slot.lease_token, commit=ready.commit, setup_hash=ready.setup_hash,
            fetched=ready.fetched, base_commit=ready.base_commit,
        )  # fmt: skip
        return Lease(slot.pk, Path(slot.path), slot.lease_token, slot.lease_expires_at, ready.commit)


def slot_renew(*, slot_id: int, lease_token: uuid.UUID | str, lease_seconds: int | None = None) -> datetime:
    """Extend a lease (the runner's heartbeat); see ``bookkeeping.slot_renew``."""
    return bookkeeping.slot_renew(slot_id=slot_id, lease_token=lease_token, lease_seconds=lease_seconds)


def slot_release(*, slot_id: int, lease_token: uuid.UUID | str) -> Slot:
    """Reset the working copy and free the slot. Fencing: only the current token releases."""
    reset = slot_release_start(slot_id=slot_id, lease_token=lease_token)
    return slot_release_done(reset=reset, broken_reason=slot_copy_reset(reset))


# ``slot_release`` in three steps, for a caller that does other work while the copy is reset (the
# runner stores its artifacts meanwhile): start (database), reset (git, no database: any thread),
# done (database).
@dataclass(frozen=True)
class SlotReset:
    """A slot this process moved to ``resetting`` (that conditional update is the ownership), with
    what its reset needs, read while the database was at hand."""

    slot_id: int
    spec: slots.RepoSpec
    path: Path
    commit: str  # what the copy returns to


def slot_release_start(*, slot_id: int, lease_token: uuid.UUID | str) -> SlotReset:
    """leased -> resetting, fenced by the token (StaleLease); then ``slot_copy_reset`` and
    ``slot_release_done``."""
    slot = bookkeeping.slot_release_begin(slot_id=slot_id, lease_token=lease_token)
    return _slot_reset_of(slot)


def _slot_reset_of(slot: Slot) -> SlotReset:
    return SlotReset(slot.pk, repo_spec(slot.repository), Path(slot.path), slot.base_commit or slot.commit)


def slot_copy_reset(reset: SlotReset) -> str:
    """Reset the copy to its commit (no database); returns "" or why it is broken."""
    try:
        slots.reset(reset.spec, reset.path, reset.commit)
    except Exception as exc:  # a reset that fails leaves the slot broken, never half-free
        message = _message(exc)
        if not message.startswith("reset failed"):
            message = f"reset failed: {message}"
        log.warning("slot %s broken at reset: %s", reset.slot_id, message)
        return message
    return ""


def slot_release_done(*, reset: SlotReset, broken_reason: str = "") -> Slot:
    """resetting -> free at the reset's commit, or broken with ``broken_reason``."""
    return bookkeeping.slot_release_finish(slot_id=reset.slot_id, commit=reset.commit, broken_reason=broken_reason)


def _reset_and_free(slot: Slot) -> Slot:
    """Called with the slot in ``resetting`` (we own it by that conditional update)."""
    reset = _slot_reset_of(slot)
    return slot_release_done(reset=reset, broken_reason=slot_copy_reset(reset))


def slot_force_release(*, slot_id: int) -> Slot:
    """Admin action: reset and free a slot whatever its lease (the holder's token goes stale).
    A slot of a remote host is freed with ``needs_reset`` (that host resets it before use)."""
    slot = bookkeeping.slot_get(slot_id)
    if slot.host != host():
        Slot.objects.filter(pk=slot_id).update(
            state=St.FREE, lease_token=None, lease_holder="", lease_expires_at=None, needs_reset=True,
            state_changed_at=timezone.now(),
        )  # fmt: skip
        bookkeeping.slots_freed()
        return bookkeeping.slot_get(slot_id)
    Slot.objects.filter(pk=slot_id).update(state=St.RESETTING, lease_token=None, state_changed_at=timezone.now())
    if not slots.has_copy(Path(slot.path)):
        Slot.objects.filter(pk=slot_id).update(state=St.CLONING)
        _clone_into(slot, slot.repository, final_state=St.FREE, lease_holder="", lease_expires_at=None)
        return bookkeeping.slot_get(slot_id)
    return _reset_and_free(slot)


def slot_mark_broken(*, slot_id: int, reason: str = "marked broken by an operator") -> Slot:
    slot = bookkeeping.slot_get(slot_id)
    bookkeeping.slot_mark_broken_row(slot.pk, reason)
    return bookkeeping.slot_get(slot_id)


def slots_reap(*, now: datetime | None = None) -> list[int]:
    """Reset and free every slot of this host whose lease expired; rescue slots stuck
    mid-operation (a slot whose reset fails becomes broken). Expired leases on remote hosts are
    freed with ``needs_reset`` (their host resets them). Returns the ids of the slots reaped.
    """
    now = now or timezone.now()
    reaped = []
    for slot in bookkeeping.slots_to_reap(host=host(), now=now):
        log.info("reaping slot %s (%s, holder %r)", slot.pk, slot.state, slot.lease_holder)
        if slot.state == St.CLONING or not slots.has_copy(Path(slot.path)):
            bookkeeping.slot_mark_broken_row(slot.pk, "reaped: clone did not finish or working copy missing")
            pool_warm(repository=slot.repository)
        else:
            _reset_and_free(slot)
        reaped.append(slot.pk)
    return reaped + bookkeeping.slots_reap_remote(now=now)


def repository_delete_slots(*, repository: Repository) -> None:
    """Remove every slot of this host from disk and the database (a repository being retired)."""
    for slot in Slot.objects.filter(repository=repository, host=host()):
        slots.remove(Path(slot.path))
        slot.delete()
