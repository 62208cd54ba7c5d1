"""Every write to the repo pool.

Invariants:
- A slot changes state only through conditional UPDATEs (``WHERE state=... [AND lease_token=...]``);
  the row count says whether we won. No git work runs inside a transaction or row lock: the state
  change commits first, the git work follows, the outcome is recorded after.
- ``lease_token`` is the fencing token, new for every lease: renew and release must present it,
  so a runner whose lease expired (and was reaped, maybe re-leased) can never touch the slot.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from common.errors import DomainError
from common.procs import run_command, safe_env, tail_of
from common.sandbox import SandboxPolicy
from repopool.errors import NoSlotAvailable, RepositoryNotFound, SlotBroken, SlotNotFound, StaleLease
from repopool.models import Repository, Slot, SlotState
from repopool.urls_policy import check_repository_url
from workcopy import git

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 3600  # a renew of a lease whose length was never stored
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


# --- warming and cloning ------------------------------------------------------------------------
# A watched file is a lockfile or a requirements list; past this size only its size counts.
SETUP_HASH_READ_MAX = 64 * 1024 * 1024
_HASH_CHUNK = 1024 * 1024


def _setup_hash(repository: Repository, path: Path) -> str:
    """The setup command and the watched files. Those files were just written by hostile code
    (the setup command itself): read in bounded chunks, up to a bounded size, regular files only
    (never a FIFO that would block the runner)."""
    digest = hashlib.sha256(repository.setup_command.encode())
    for name in repository.setup_watch_files:
        digest.update(name.encode() + b"\0")
        try:
            fd = os.open(path / name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            digest.update(f"{info.st_size}\0".encode())
            left = SETUP_HASH_READ_MAX
            while left > 0 and (chunk := handle.read(min(_HASH_CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()


def _run_setup(repository: Repository, path: Path) -> None:
    if not repository.setup_command.strip():
        return
    out = Path(settings.TMP_ROOT) / f"setup-{repository.name}-{uuid.uuid4().hex[:8]}.log"
    try:
        result = run_command(
            repository.setup_command,
            cwd=path,
            timeout=settings.REPO_POOL_SETUP_TIMEOUT,
            output_path=out,
            env=safe_env(),
            policy=SandboxPolicy(writable=path, network=repository.setup_network),
        )
        tail = tail_of(out, 2000)
    finally:
        out.unlink(missing_ok=True)
    if result.timed_out:
        raise SlotBroken(f"setup command timed out after {settings.REPO_POOL_SETUP_TIMEOUT}s: {tail}")
    if not result.ok:
        raise SlotBroken(f"setup command exited with {result.exit_code}: {tail}")


def _prepare_new_slot(slot: Slot, repository: Repository) -> tuple[str, str]:
    """Clone and set up; returns (commit, setup hash). Runs outside any transaction."""
    path = Path(slot.path)
    git.clone(repository.url, path)
    commit = git.resolve_or_fetch(path, repository.default_branch, url=repository.url)
    # The same state a reset leaves: detached at the commit, no local branches.
    git.reset_clean(path, commit, list(repository.keep_paths))
    _run_setup(repository, path)
    return commit, _setup_hash(repository, path)


def _mark_broken(
    slot_id: int, error: str, *, from_states: list[str] | None = None, token: uuid.UUID | None = None
) -> bool:
    query = Slot.objects.filter(pk=slot_id)
    if from_states:
        query = query.filter(state__in=from_states)
    if token is not None:
        query = query.filter(lease_token=token)
    return bool(
        query.update(
            state=St.BROKEN,
            last_error=error[:10000],
            lease_token=None,
            lease_holder="",
            lease_expires_at=None,
            state_changed_at=timezone.now(),
        )
    )


def _create_slot_row(repository: Repository, *, state: str = St.CLONING, **fields) -> Slot | None:
    """Insert a slot at the lowest free index of this host; None when the pool is full."""
    taken = set(Slot.objects.filter(repository=repository, host=host()).values_list("index", flat=True))
    if len(taken) >= repository.pool_size:
        return None
    index = next(i for i in range(repository.pool_size + len(taken) + 1) if i not in taken)
    try:
        with transaction.atomic():
            return Slot.objects.create(
                repository=repository,
                index=index,
                host=host(),
                path=str(slot_path(repository, index)),
                state=state,
                **fields,
            )
    except IntegrityError:
        return None  # another process took that index first


def pool_warm(*, repository: Repository) -> list[Slot]:
    """Bring the pool of this host up to ``pool_size`` ready slots; re-clone broken ones.

    A slot whose clone or setup fails ends ``broken`` with the error kept; the others go on.
    """
    to_prepare: list[Slot] = []
    for slot in Slot.objects.filter(repository=repository, host=host(), state=St.BROKEN):
        if Slot.objects.filter(pk=slot.pk, state=St.BROKEN).update(state=St.CLONING, state_changed_at=timezone.now()):
            to_prepare.append(slot)
    while True:
        slot = _create_slot_row(repository)
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
    try:
        commit, setup_hash = _prepare_new_slot(slot, repository)
    except Exception as exc:  # any failure of clone or setup leaves the slot broken, with why
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        log.warning("slot %s broken: %s", slot.pk, message)
        _mark_broken(slot.pk, message)
        return False
    Slot.objects.filter(pk=slot.pk).update(
        state=final_state,
        commit=commit,
        base_commit=commit,
        setup_hash=setup_hash,
        last_error="",
        state_changed_at=timezone.now(),
        **final_fields,
    )
    return True


# --- leasing ------------------------------------------------------------------------------------
def _validate_lease_seconds(lease_seconds: int) -> None:
    if not 1 <= lease_seconds <= settings.REPO_POOL_MAX_LEASE_SECONDS:
        raise DomainError(
            f"lease_seconds must be between 1 and {settings.REPO_POOL_MAX_LEASE_SECONDS}", field="lease_seconds"
        )


def _claim_free_slot(repository: Repository, holder: str, lease_seconds: int) -> Slot | None:
    """Atomically move one free slot of this host to leased; None when there is none."""
    now = timezone.now()
    token = Slot.new_token()
    with transaction.atomic():
        candidate = (
            Slot.objects.filter(repository=repository, host=host(), state=St.FREE)
            .order_by("lease_count", "index")
            .select_for_update(skip_locked=True)
            .first()
        )
        if candidate is None:
            return None
        updated = Slot.objects.filter(pk=candidate.pk, state=St.FREE).update(
            state=St.LEASED,
            lease_token=token,
            lease_holder=holder[:255],
            leased_at=now,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            lease_seconds=lease_seconds,
            state_changed_at=now,
        )
    if not updated:
        return None
    Slot.objects.filter(pk=candidate.pk).update(lease_count=candidate.lease_count + 1)
    candidate.refresh_from_db()
    return candidate


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

    With ``fetch`` a branch name is fetched from origin first, so the lease starts from its latest
    commit; a commit id already present needs no fetch (the fastest allocation).

    Grows the pool on demand up to ``pool_size``; waits up to ``wait_seconds`` for a slot to free
    up, then raises NoSlotAvailable. A slot found corrupted on disk is marked broken and another
    one is tried. A ref that does not exist is refused (the slot goes back to the pool).
    """
    _validate_lease_seconds(lease_seconds)
    if not 0 <= wait_seconds <= settings.REPO_POOL_MAX_WAIT_SECONDS:
        raise DomainError(
            f"wait_seconds must be between 0 and {settings.REPO_POOL_MAX_WAIT_SECONDS}", field="wait_seconds"
        )
    ref = ref or repository.default_branch
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while True:
        slot = _claim_free_slot(repository, holder, lease_seconds)
        if slot is None:
            slot = _grow_on_demand(repository, holder, lease_seconds)
        if slot is not None:
            try:
                commit = _checkout_for_lease(slot, repository, ref, fetch)
            except git.RefNotFound:
                _release_unchanged(slot)
                raise
            except Exception as exc:  # the slot's copy is damaged: take it out, try another
                message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                _mark_broken(slot.pk, message, token=slot.lease_token)
                log.warning("slot %s broken at allocation: %s", slot.pk, message)
                continue
            return Lease(slot.pk, Path(slot.path), slot.lease_token, slot.lease_expires_at, commit)
        if time.monotonic() >= deadline:
            raise NoSlotAvailable(
                f"no slot of {repository.name} became free within {wait_seconds:g}s "
                f"(pool size {repository.pool_size} on {host()})"
            )
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 1.0)


def _grow_on_demand(repository: Repository, holder: str, lease_seconds: int) -> Slot | None:
    now = timezone.now()
    token = Slot.new_token()
    slot = _create_slot_row(repository, lease_holder=holder[:255], lease_token=token)
    if slot is None:
        return None
    if not _clone_into(
        slot,
        repository,
        final_state=St.LEASED,
        leased_at=now,
        lease_expires_at=timezone.now() + timedelta(seconds=lease_seconds),
        lease_seconds=lease_seconds,
        lease_count=1,
    ):
        return None
    slot.refresh_from_db()
    return slot


def _checkout_for_lease(slot: Slot, repository: Repository, ref: str, fetch: bool) -> str:
    path = Path(slot.path)
    if not (path / ".git").is_dir():
        raise SlotBroken(f"working copy {path} is missing")
    # A slot that fetched moments ago is fresh enough: a busy pool does not pay a fetch per task.
    ttl = settings.REPO_POOL_FETCH_TTL
    refresh = fetch and (slot.fetched_at is None or (timezone.now() - slot.fetched_at).total_seconds() >= ttl)
    commit = git.resolve_or_fetch(path, ref, url=repository.url, refresh=refresh)
    fields: dict = {"commit": commit}
    if refresh:
        fields["fetched_at"] = timezone.now()
    # After a reset HEAD is slot.commit (the reset records it), so an unchanged ref needs no checkout.
    if commit != slot.commit:
        git.checkout_detached(path, commit)
    if repository.setup_watch_files and _setup_hash(repository, path) != slot.setup_hash:
        _run_setup(repository, path)
        fields["setup_hash"] = _setup_hash(repository, path)
    Slot.objects.filter(pk=slot.pk).update(**fields)
    return commit


def _release_unchanged(slot: Slot) -> None:
    Slot.objects.filter(pk=slot.pk, lease_token=slot.lease_token).update(
        state=St.FREE, lease_token=None, lease_holder="", lease_expires_at=None, state_changed_at=timezone.now()
    )


def _get_slot(slot_id: int) -> Slot:
    try:
        return Slot.objects.select_related("repository").get(pk=slot_id)
    except (Slot.DoesNotExist, ValueError, TypeError):
        raise SlotNotFound(f"slot {slot_id} does not exist") from None


def slot_renew(*, slot_id: int, lease_token: uuid.UUID | str, lease_seconds: int | None = None) -> datetime:
    """Extend a lease (the runner's heartbeat) to now + ``lease_seconds``, by default the length the
    lease was allocated with. Refused (StaleLease) with a wrong or stale token."""
    if lease_seconds is not None:
        _validate_lease_seconds(lease_seconds)
    _get_slot(slot_id)
    current = Slot.objects.filter(pk=slot_id, state=St.LEASED, lease_token=lease_token)
    if lease_seconds is None:
        # The length is written once per lease, with its token: read under the same token filter,
        # it belongs to this lease (a lease from before lengths were stored keeps the old hour).
        lease_seconds = current.values_list("lease_seconds", flat=True).first() or DEFAULT_LEASE_SECONDS
    expires = timezone.now() + timedelta(seconds=lease_seconds)
    if not current.update(lease_expires_at=expires):
        raise StaleLease("lease token does not match the slot's current lease")
    return expires


def slot_release(*, slot_id: int, lease_token: uuid.UUID | str) -> Slot:
    """Reset the working copy and free the slot. Fencing: only the current token releases."""
    slot = _get_slot(slot_id)
    if not Slot.objects.filter(pk=slot_id, state=St.LEASED, lease_token=lease_token).update(
        state=St.RESETTING, lease_token=None, state_changed_at=timezone.now()
    ):
        raise StaleLease("lease token does not match the slot's current lease")
    return _reset_and_free(slot)


def _reset_and_free(slot: Slot) -> Slot:
    """Called with the slot in ``resetting`` (we own it by that conditional update)."""
    repository = slot.repository
    try:
        git.reset_clean(Path(slot.path), slot.base_commit or slot.commit, list(repository.keep_paths))
    except Exception as exc:  # a reset that fails leaves the slot broken, never half-free
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        _mark_broken(slot.pk, f"reset failed: {message}", from_states=[St.RESETTING])
        log.warning("slot %s broken at reset: %s", slot.pk, message)
    else:
        Slot.objects.filter(pk=slot.pk, state=St.RESETTING).update(
            state=St.FREE,
            lease_holder="",
            lease_expires_at=None,
            commit=slot.base_commit or slot.commit,
            state_changed_at=timezone.now(),
        )
    slot.refresh_from_db()
    return slot


def slot_force_release(*, slot_id: int) -> Slot:
    """Admin action: reset and free a slot whatever its lease (the holder's token goes stale)."""
    slot = _get_slot(slot_id)
    Slot.objects.filter(pk=slot_id).update(state=St.RESETTING, lease_token=None, state_changed_at=timezone.now())
    if not (Path(slot.path) / ".git").is_dir():
        Slot.objects.filter(pk=slot_id).update(state=St.CLONING)
        _clone_into(slot, slot.repository, final_state=St.FREE, lease_holder="", lease_expires_at=None)
        slot.refresh_from_db()
        return slot
    return _reset_and_free(slot)


def slot_mark_broken(*, slot_id: int, reason: str = "marked broken by an operator") -> Slot:
    slot = _get_slot(slot_id)
    _mark_broken(slot.pk, reason)
    slot.refresh_from_db()
    return slot


def slots_reap(*, now: datetime | None = None) -> list[int]:
    """Reset and free every slot whose lease expired; rescue slots stuck mid-operation.

    A slot whose reset fails becomes broken. Returns the ids of the slots reaped.
    """
    now = now or timezone.now()
    stuck_before = now - timedelta(seconds=settings.REPO_POOL_STUCK_SECONDS)
    reaped = []
    candidates = Slot.objects.filter(host=host()).filter(
        Q(state=St.LEASED, lease_expires_at__lt=now)
        | Q(state__in=[St.RESETTING, St.CLONING], state_changed_at__lt=stuck_before)
    )
    for slot in candidates.select_related("repository"):
        if not Slot.objects.filter(
            pk=slot.pk, state=slot.state, lease_token=slot.lease_token, state_changed_at=slot.state_changed_at
        ).update(state=St.RESETTING, lease_token=None, state_changed_at=timezone.now()):
            continue  # renewed or released meanwhile
        log.info("reaping slot %s (%s, holder %r)", slot.pk, slot.state, slot.lease_holder)
        if slot.state == St.CLONING or not (Path(slot.path) / ".git").is_dir():
            _mark_broken(slot.pk, "reaped: clone did not finish or working copy missing")
            pool_warm(repository=slot.repository)
        else:
            _reset_and_free(slot)
        reaped.append(slot.pk)
    return reaped


def repository_delete_slots(*, repository: Repository) -> None:
    """Remove every slot of this host from disk and the database (a repository being retired)."""
    for slot in Slot.objects.filter(repository=repository, host=host()):
        shutil.rmtree(slot.path, ignore_errors=True)
        git.trusted_config_path(Path(slot.path)).unlink(missing_ok=True)
        slot.delete()
