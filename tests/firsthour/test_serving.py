"""The API, the admin and the API docs served the README's way: a real gunicorn, no internet."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.firsthour.helpers import ROOT, VENV_BIN, clean_env, free_port, get, manage, stop, wait_until_serving

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def start_gunicorn(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [str(VENV_BIN / "gunicorn"), "agentrunner.wsgi", "-w", "1", "-b", f"127.0.0.1:{port}", "--timeout", "60"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_serving(base + "/api/health/", process)
    return process, base


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """gunicorn as a newcomer starts it after `make demo`: DEBUG on (the default), no collectstatic."""
    data = tmp_path_factory.mktemp("served")
    env = clean_env(data)
    migrated = manage("migrate", "--noinput", "-v", "0", env=env)
    assert migrated.returncode == 0, migrated.stderr
    process, base = start_gunicorn(env)
    yield base
    stop(process)


def local_assets(base: str, path: str) -> list[str]:
    status, body = get(base + path)
    assert status == 200, (path, status)
    assets = ASSET.findall(body.decode())
    assets = [a for a in assets if not a.startswith("#")]  # anchors within the page
    remote = [a for a in assets if not a.startswith("/") or a.startswith("//")]
    assert not remote, f"{path} loads from another host: {remote}"
    return assets


def test_admin_and_browsable_api_get_their_css(served):
    assert get(served + "/static/admin/css/base.css")[0] == 200
    assert get(served + "/static/rest_framework/css/bootstrap.min.css")[0] == 200
    stylesheets = [a for a in local_assets(served, "/admin/login/") if a.endswith(".css")]
    assert stylesheets and all(get(served + a)[0] == 200 for a in stylesheets)


@pytest.mark.parametrize("page", ["/api/docs/", "/api/redoc/"])
def test_api_docs_use_only_local_assets_that_answer(served, page):
    assets = local_assets(served, page)
    scripts = [a for a in assets if a.endswith(".js")]
    assert scripts, f"{page} loads no script"
    for asset in assets:
        assert asset.startswith("/static/"), asset
        assert get(served + asset)[0] == 200, asset
    status, schema = get(served + "/api/schema/")
    assert status == 200 and b"openapi" in schema


def test_static_files_with_debug_off_after_collectstatic(tmp_path):
    """Production: DEBUG off, static files gathered by collectstatic (what `make serve` runs)."""
    env = clean_env(tmp_path, DJANGO_DEBUG="0", DJANGO_SECRET_KEY="test-secret-key-for-serving")
    for command in (["migrate", "--noinput", "-v", "0"], ["collectstatic", "--noinput", "-v", "0"]):
        done = manage(*command, env=env)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "static" / "admin" / "css" / "base.css").exists()
    process, base = start_gunicorn(env)
    try:
        status, _ = get(base + "/static/admin/css/base.css")
        assert status == 200
        assert get(base + "/static/drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js")[0] == 200
    finally:
        stop(process)
