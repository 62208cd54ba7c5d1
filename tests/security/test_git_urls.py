"""Repository URLs are checked before git sees them, and git never runs a command a URL or a
slot's .git asks for. Every attack here is real: real git, real files, a marker a command would
create; the marker must stay absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from repopool.models import Repository

pytestmark = pytest.mark.django_db

BASE_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a command smuggled in through a URL ran"


@pytest.fixture
def roots(tmp_path, settings):
    """Production-like policy: local repositories only under tmp_path/allowed."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    settings.AGENTRUNNER_LOCAL_REPO_ROOTS = [str(allowed)]
    return allowed


# MARKER is replaced by the marker file's path: the file a smuggled command would create.
INJECTION_URLS = [
    "--upload-pack=touch MARKER",
    "--upload-pack=touch MARKER;",
    "-u touch MARKER",
    "-utouch MARKER",
    "--config=core.sshCommand=touch MARKER",
    "ext::sh -c touch% MARKER",
    "ext::sh -c 'touch MARKER'",
    "EXT::sh -c touch% MARKER",
    "fd::7",
    "ssh://-oProxyCommand=touch%20MARKER/repo",
    "-oProxyCommand=touch MARKER:repo",
    "ssh://-oProxyCommand=touch MARKER@host/repo",
    "git@-oProxyCommand=touch:MARKER",
    "https://example.com/repo\n--upload-pack=touch MARKER",
    "https://example.com/re\x00po",
    " https://example.com/repo",
    "https://example.com/repo\u200b",
    "https://example.com/\u202erepo",
    "http://example.com/repo.git",
    "https://user:secret@example.com/repo.git",
    "ftp://example.com/repo.git",
    "foo://example.com/repo.git",
    "https:///repo.git",
    "https://example.com",
]


def injection_urls(marker: Path) -> list[str]:
    return [url.replace("MARKER", str(marker)) for url in INJECTION_URLS]


@pytest.mark.parametrize("template", INJECTION_URLS)
def test_api_refuses_injection_and_unsafe_urls_before_git_runs(staff_api, marker, template, make_repo):
    url = template.replace("MARKER", str(marker))
    good = str(make_repo())
    for field in ("url", "push_url"):
        body = {"name": "evil", "url": good, "push_url": ""}
        body[field] = url
        response = staff_api.post("/api/repositories/", body, format="json")
        assert response.status_code == 400, response.content
        assert field in response.json()["errors"], response.json()
        assert Repository.objects.count() == 0
    assert not marker.exists()


def test_the_service_refuses_the_same_urls_with_the_field(marker):
    from repopool import services
    from repopool.urls_policy import UrlRefused

    for url in injection_urls(marker):
        with pytest.raises(UrlRefused) as info:
            services.repository_create(name="evil", url=url)
        assert info.value.field == "url" and info.value.status_code == 400
        with pytest.raises(UrlRefused) as info:
            services.repository_create(name="evil", url="https://example.com/ok.git", push_url=url, verify=False)
        assert info.value.field == "push_url"


def test_git_layer_refuses_an_injected_url_even_if_one_was_stored(marker, tmp_path, repository):
    """A row written before the policy (or a push_url the server sends the runner) still never
    reaches git: clone, ls-remote, fetch and push check it again, as a GitError the runner handles."""
    from repopool import services
    from workcopy import git

    lease = services.slot_allocate(repository=repository, holder="h")
    for url in injection_urls(marker):
        with pytest.raises(git.UrlNotAllowed):
            git.remote_head(url)
        with pytest.raises(git.UrlNotAllowed):
            git.clone(url, tmp_path / "dest")
        with pytest.raises(git.UrlNotAllowed):
            git.fetch(lease.path, url, "main")
        with pytest.raises(git.UrlNotAllowed) as info:
            git.push(lease.path, url, "agent/x")
        assert info.value.field == "push_url"
    Repository.objects.filter(pk=repository.pk).update(url=f"--upload-pack=touch {marker}")
    repository.refresh_from_db()
    services.slot_release(slot_id=lease.slot_id, lease_token=lease.lease_token)
    with pytest.raises(git.RefNotFound):  # the fetch is refused, so an unknown branch stays unknown
        services.slot_allocate(repository=repository, holder="h", ref="no-such-branch")


def test_local_paths_outside_the_roots_are_refused(staff_api, roots, make_repo, tmp_path, marker):
    outside = make_repo()  # a real repository, under tmp_path/origin: outside the roots
    (roots / "escape").symlink_to(outside)
    attempts = [
        "/srv/app",
        "file:///srv/app/.git",
        str(outside),
        f"file://{outside}",
        f"file://{outside}/.git",
        f"file://localhost{outside}",
        f"{roots}/../origin/{outside.name}",
        f"file://{roots}/../origin/{outside.name}",
        str(roots / "escape"),
        f"file://{roots}/escape",
        os.path.relpath(outside),
    ]
    for url in attempts:
        response = staff_api.post("/api/repositories/", {"name": "local", "url": url}, format="json")
        assert response.status_code == 400, (url, response.content)
        assert "AGENTRUNNER_LOCAL_REPO_ROOTS" in response.json()["errors"]["url"][0], (url, response.json())
        response = staff_api.post(
            "/api/repositories/",
            {"name": "local", "url": "https://example.com/ok.git", "push_url": url},
            format="json",
        )
        assert response.status_code == 400 and "push_url" in response.json()["errors"], url
    assert Repository.objects.count() == 0


def test_no_local_path_at_all_when_debug_is_off_and_no_roots_are_set(make_repo, settings):
    from repopool.urls_policy import UrlRefused, check_repository_url

    settings.AGENTRUNNER_LOCAL_REPO_ROOTS = []
    with pytest.raises(UrlRefused, match="none configured"):
        check_repository_url(str(make_repo()))
    assert check_repository_url("git@github.com:owner/repo.git") == "git@github.com:owner/repo.git"


def test_a_repository_inside_the_roots_is_registered_and_cloned(staff_api, settings, make_repo, tmp_path):
    from repopool import services

    origin = make_repo()
    settings.AGENTRUNNER_LOCAL_REPO_ROOTS = [str(tmp_path / "origin")]
    (tmp_path / "origin" / "alias").symlink_to(origin)  # a symlink that stays inside is fine
    for name, url in [("plain", str(origin)), ("file", f"file://{origin}"), ("linked", str(tmp_path / "origin/alias"))]:
        response = staff_api.post("/api/repositories/", {"name": name, "url": url, "pool_size": 1}, format="json")
        assert response.status_code == 201, response.content
        assert response.json()["url"] in (str(origin.resolve()), f"file://{origin.resolve()}")
        slots = services.pool_warm(repository=Repository.objects.get(pk=response.json()["id"]))
        assert [slot.state for slot in slots] == ["free"], [slot.last_error for slot in slots]


def test_the_slot_pool_is_never_an_origin(make_repo, settings):
    from repopool import services
    from repopool.urls_policy import UrlRefused

    repo = services.repository_create(name="first", url=str(make_repo()), pool_size=1)
    [slot] = services.pool_warm(repository=repo)
    settings.AGENTRUNNER_LOCAL_REPO_ROOTS = None  # even with every local path allowed
    with pytest.raises(UrlRefused, match="slot pool"):
        services.repository_create(name="second", url=slot.path)


def test_update_checks_url_and_push_url(staff_api, make_repo, roots, marker, tmp_path, settings):
    settings.AGENTRUNNER_LOCAL_REPO_ROOTS = [str(tmp_path / "origin")]
    created = staff_api.post("/api/repositories/", {"name": "upd", "url": str(make_repo())}, format="json")
    assert created.status_code == 201, created.content
    repo_id = created.json()["id"]
    for field, value in [("url", f"--upload-pack=touch {marker}"), ("push_url", "/srv/app"), ("url", "/srv/app")]:
        response = staff_api.patch(f"/api/repositories/{repo_id}/", {field: value}, format="json")
        assert response.status_code == 400 and field in response.json()["errors"], response.content
    assert Repository.objects.get(pk=repo_id).push_url == ""


def test_add_repository_and_runagent_refuse_with_a_cli_error(marker, roots, make_repo):
    outside = make_repo()
    for url in [f"--upload-pack=touch {marker}", f"ext::sh -c touch% {marker}", str(outside), "file:///srv/app/.git"]:
        with pytest.raises(CommandError, match="url|Local paths|Remote helper|option"):
            call_command("add_repository", "evil", url)
        with pytest.raises(CommandError):
            call_command("add_repository", "evil", "https://example.com/ok.git", f"--push-url={url}")
        with pytest.raises(CommandError):
            call_command("runagent", f"--repo={url}", "--instructions=do it")
    assert Repository.objects.count() == 0


def test_manage_py_add_repository_exits_non_zero_and_runs_nothing(marker, tmp_path):
    env = {
        **os.environ,
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "test-only",
        "AGENTRUNNER_DATA_DIR": str(tmp_path / "cli-data"),
    }
    env.pop("AGENTRUNNER_LOCAL_REPO_ROOTS", None)
    for url in (f"--upload-pack=touch {marker}", "/srv/app"):
        proc = subprocess.run(
            [sys.executable, "manage.py", "add_repository", "evil", url],
            cwd=BASE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert "CommandError" in proc.stderr or "Error" in proc.stderr, proc.stderr


def test_local_roots_setting_defaults(tmp_path):
    """Empty in production, every local path on a laptop, "*" or a list when set."""
    cases = [
        ({"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "x"}, []),
        ({"DJANGO_DEBUG": "1"}, None),
        ({"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "x", "AGENTRUNNER_LOCAL_REPO_ROOTS": "*"}, None),
        (
            {"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "x", "AGENTRUNNER_LOCAL_REPO_ROOTS": f"{tmp_path}/a/../b,/srv"},
            [str(tmp_path.resolve() / "b"), "/srv"],
        ),
    ]
    # One fresh interpreter reads the settings module once per environment.
    script = """
import importlib, json, os, sys
for extra in json.loads(sys.argv[1]):
    for name in ("DJANGO_DEBUG", "DJANGO_SECRET_KEY", "AGENTRUNNER_LOCAL_REPO_ROOTS"):
        os.environ.pop(name, None)
    os.environ.update(extra)
    sys.modules.pop("agentrunner.settings", None)
    print(json.dumps(importlib.import_module("agentrunner.settings").AGENTRUNNER_LOCAL_REPO_ROOTS))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps([extra for extra, _ in cases])],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [expected for _, expected in cases]


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/owner/repo.git",
        "https://git.example.com:8443/group/sub/repo",
        "ssh://git@github.com/owner/repo.git",
        "ssh://git@[::1]:2222/repo.git",
        "git@github.com:owner/repo.git",
        "github.com:owner/repo.git",
        "git://example.org/repo.git",
    ],
)
def test_ordinary_remote_urls_are_accepted_as_given(url):
    from repopool.urls_policy import check_repository_url

    assert check_repository_url(url) == url


def test_the_admin_form_applies_the_same_policy(staff_api, marker, make_repo):
    from django.test import Client

    browser = Client()
    browser.force_login(staff_api.user)
    form = {
        "name": "via-admin",
        "url": f"--upload-pack=touch {marker}",
        "default_branch": "main",
        "pool_size": 1,
        "test_command": "true",
        "setup_watch_files": "[]",
        "keep_paths": "[]",
        "push_url": "ext::sh -c touch% /tmp/x",
    }
    response = browser.post("/admin/repopool/repository/add/", form)
    assert response.status_code == 200  # the form again, with the errors
    errors = response.context["adminform"].form.errors
    assert "url" in errors and "push_url" in errors, errors
    assert Repository.objects.count() == 0
    form.update(url=str(make_repo()), push_url="")
    assert browser.post("/admin/repopool/repository/add/", form).status_code == 302
    assert Repository.objects.get().url == form["url"]
