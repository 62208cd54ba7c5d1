from __future__ import annotations

import sys

import pytest

from repopool import services as pool
from tests.llm_server import LLMServer, tool

API_KEY = "sk-runner-secret-0123456789abcdef"
TEST_COMMAND = f"{sys.executable} -m pytest -q -p no:cacheprovider"


@pytest.fixture
def llm(settings):
    server = LLMServer(api_key=API_KEY).start()
    settings.OPENAI_API_KEY = API_KEY
    settings.OPENAI_BASE_URL = server.base_url
    settings.AGENTRUNNER_LLM_PROVIDER = "openai"
    settings.AGENTRUNNER_LLM_MODEL = "test-model"
    settings.AGENTRUNNER_LLM_PRICES = {"test-model": ["1.00", "2.00"]}
    settings.AGENTRUNNER_LLM_MAX_RETRIES = 2
    settings.AGENTRUNNER_LLM_BACKOFF_BASE = 0.01
    settings.AGENTRUNNER_LLM_TIMEOUT = 10
    settings.AGENTRUNNER_SLOT_WAIT_SECONDS = 0.2
    yield server
    server.stop()


def fixer(request):
    """A scripted agent that fixes the sample project: edit calc.py, run the tests, finish."""
    done = [m for m in request["messages"] if m["role"] == "tool"]
    if not done:
        return tool("edit_file", path="calc.py", old_text="a - b", new_text="a + b")
    if len(done) == 1:
        return tool("run_tests", args=["-x"])
    return tool("finish", summary="add() now adds")


@pytest.fixture
def sample_repo(db, make_repo):
    return pool.repository_create(
        name="sample", url=str(make_repo()), pool_size=2, test_command=TEST_COMMAND, keep_paths=[".venv"]
    )


# --- the HTTP mode: the project's server in gunicorn, a runner token, the runner in this process ---
@pytest.fixture(scope="session")
def _served_api(django_db_setup, django_db_blocker, tmp_path_factory):
    """gunicorn serving the test database, started once: each test's transaction=True data is
    committed, so the server sees it, and flushed after the test as usual."""
    from django.db import connection

    if connection.vendor != "postgresql":
        yield None
        return
    from tests.runner.served import serve

    served = serve(data_dir=tmp_path_factory.mktemp("api-server"))
    yield served
    served.stop()


@pytest.fixture
def api_server(_served_api, transactional_db, require_postgres, settings):
    """The live server. Its data folder (artifacts/, results/) is its own; this test's settings
    point there too, so assertions read what the server stored. The runner in this process keeps
    pool/, spool/ and tmp/ in the test's own data folder."""
    served = _served_api
    assert served.process.poll() is None, f"the API server died:\n{served.log()[-4000:]}"
    settings.RESULTS_ROOT = served.data_dir / "results"
    settings.ARTIFACTS_ROOT = served.data_dir / "artifacts"
    storages = dict(settings.STORAGES)
    if storages["artifacts"]["BACKEND"].endswith("FileSystemStorage"):
        storages["artifacts"] = {
            **storages["artifacts"],
            "OPTIONS": {"location": str(served.data_dir / "artifacts"), "allow_overwrite": True},
        }
    settings.STORAGES = storages
    return served


@pytest.fixture
def runner_token(transactional_db):
    from runners import services

    _token, raw = services.runner_token_create(name="test-runner-host")
    return raw


def use_server(settings, base_url: str, token: str, *, host: str = "test-host") -> None:
    """Make this process a remote runner of ``base_url`` (``Ports.from_settings`` goes HTTP)."""
    settings.AGENTRUNNER_API_URL = base_url
    settings.AGENTRUNNER_RUNNER_TOKEN = token
    settings.AGENTRUNNER_HOST = host
    settings.AGENTRUNNER_API_RETRY_SECONDS = 15.0
    settings.AGENTRUNNER_API_FINISH_RETRY_SECONDS = 30.0
    settings.AGENTRUNNER_API_BACKOFF_BASE = 0.05
    settings.AGENTRUNNER_API_BACKOFF_MAX = 1.0
    from agentrunner.runner.http import ApiConfig, announce_host

    announce_host(ApiConfig.from_settings())


@pytest.fixture(params=["local", "http"])
def mode(request, settings):
    """The pipeline's ports: in-process (``local``), or HTTP against a live gunicorn (``http``)."""
    if request.param == "http":
        served = request.getfixturevalue("api_server")
        use_server(settings, served.base_url, request.getfixturevalue("runner_token"))
    return request.param
