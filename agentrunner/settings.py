"""Every setting of Agent Runner, read from the environment in this one module.

Defaults are safe for a laptop: SQLite under ``var/``, Celery tasks run eagerly in-process,
artifacts on local disk. Production sets ``DJANGO_DEBUG=0`` and must then set a secret key.
"""

from __future__ import annotations

import socket
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

DEBUG = env.bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off "
            "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(50))')"
        )
    SECRET_KEY = "insecure-development-key-do-not-use-in-production"
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])

# --- Data on disk -------------------------------------------------------------------------------
DATA_DIR = Path(env.str("AGENTRUNNER_DATA_DIR", default=str(BASE_DIR / "var"))).resolve()
REPO_POOL_ROOT = Path(env.str("REPO_POOL_ROOT", default=str(DATA_DIR / "pool"))).resolve()
RESULTS_ROOT = Path(env.str("AGENTRUNNER_RESULTS_DIR", default=str(DATA_DIR / "results"))).resolve()
ARTIFACTS_ROOT = Path(env.str("ARTIFACTS_ROOT", default=str(DATA_DIR / "artifacts"))).resolve()
SPOOL_ROOT = DATA_DIR / "spool"
TMP_ROOT = DATA_DIR / "tmp"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc shipped as static files: docs work offline
    "repopool",
    "artifacts",
    "registry",
    "runners",
    "agentrunner",
    "inspector",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # /static/ under gunicorn; see the static block
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "runners.middleware.RunnerTokenConfinement",  # a runner token opens /api/runner/ only
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "agentrunner.middleware.DatabaseUnavailableMiddleware",  # a database gone away: 503, not 500
]

ROOT_URLCONF = "agentrunner.urls"
WSGI_APPLICATION = "agentrunner.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------------------------
# An empty DATABASE_URL counts as unset (a laptop's SQLite), not as a URL with no engine.
DATABASES = {
    "default": env.db_url_config(env.str("DATABASE_URL", default="") or f"sqlite:///{DATA_DIR / 'db.sqlite3'}")
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several runner threads write at once: take the write lock at BEGIN (no upgrade deadlocks)
    # and wait for it instead of failing with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # Tests use a file too: an in-memory shared-cache database locks whole tables across threads.
    DATABASES["default"].setdefault("TEST", {})["NAME"] = str(DATA_DIR / "test-db.sqlite3")
# Persistent connections: a fresh PostgreSQL connection costs milliseconds (authentication, a
# backend process) on every request otherwise. The health check drops one the server closed.
# SQLite opens a file, which is cheap, so it keeps Django's default of one per request.
_is_sqlite = DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DJANGO_CONN_MAX_AGE", default=0 if _is_sqlite else 60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Static files (admin, browsable API, API docs) -----------------------------------------------
# WhiteNoise serves them from the WSGI app itself, so `gunicorn agentrunner.wsgi` needs no web
# server in front. With DEBUG on it serves straight from the apps' folders (no collectstatic
# needed, edits show at once); with DEBUG off it serves what `manage.py collectstatic` gathered in
# STATIC_ROOT (`make serve` runs it), compressed, with long cache headers.
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
WHITENOISE_USE_FINDERS = DEBUG
WHITENOISE_AUTOREFRESH = DEBUG

# Request bodies: JSON bodies are small; artifacts stream to temporary files, never memory.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("AGENTRUNNER_MAX_JSON_BODY", default=1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = 0
FILE_UPLOAD_TEMP_DIR = str(TMP_ROOT)
FILE_UPLOAD_HANDLERS = ["django.core.files.uploadhandler.TemporaryFileUploadHandler"]

# --- Artifact storage ---------------------------------------------------------------------------
ARTIFACTS_STORAGE_BACKEND = env.str("ARTIFACTS_STORAGE", default="local")  # local | s3
ARTIFACTS_MAX_SIZE = env.int("ARTIFACTS_MAX_SIZE", default=5 * 1024**3)
ARTIFACTS_INLINE_PREVIEW_MAX = env.int("ARTIFACTS_INLINE_PREVIEW_MAX", default=256 * 1024)
if ARTIFACTS_STORAGE_BACKEND == "s3":
    _artifact_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env.str("ARTIFACTS_S3_BUCKET"),
            "endpoint_url": env.str("ARTIFACTS_S3_ENDPOINT_URL", default=None),
            "region_name": env.str("ARTIFACTS_S3_REGION", default=None),
            "access_key": env.str("ARTIFACTS_S3_ACCESS_KEY_ID", default=None),
            "secret_key": env.str("ARTIFACTS_S3_SECRET_ACCESS_KEY", default=None),
            "file_overwrite": True,
            "default_acl": None,
        },
    }
elif ARTIFACTS_STORAGE_BACKEND == "local":
    _artifact_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        # Content-addressed keys: a second write of the same key is the same bytes.
        "OPTIONS": {"location": str(ARTIFACTS_ROOT), "allow_overwrite": True},
    }
else:
    raise ImproperlyConfigured("ARTIFACTS_STORAGE must be 'local' or 's3'")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Not the manifest variant: a missing manifest would turn every admin page into a 500.
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    "artifacts": _artifact_storage,
}

# --- REST API -----------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "agentrunner.authentication.TokenOrBearerAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON only: a form body would parse into an empty dict and answer "field required" for every
    # field. Artifact uploads declare their own parsers (multipart and raw bodies).
    "DEFAULT_PARSER_CLASSES": ["common.drf.LimitedJSONParser"],
    "DEFAULT_PAGINATION_CLASS": "common.drf.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "common.drf.exception_handler",
    "UNAUTHENTICATED_USER": None,
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Agent Runner API",
    "DESCRIPTION": "Tasks, repository pools and artifacts of a self-hosted AI coding task runner.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI and ReDoc from our own /static/ (drf-spectacular-sidecar), never from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # No validator badge: it would send the schema's URL to validator.swagger.io.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "TaskStatusEnum": "registry.states.TaskStatus.choices",
        "FailureReasonEnum": "registry.states.FailureReason.choices",
        "SlotStateEnum": "repopool.models.SlotState.choices",
        "ArtifactKindEnum": "artifacts.models.ArtifactKind.choices",
    },
}

# --- Celery -------------------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="")
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Enqueue a Celery job when a task becomes runnable (only meaningful with a broker).
AGENTRUNNER_AUTO_ENQUEUE = env.bool("AGENTRUNNER_AUTO_ENQUEUE", default=bool(CELERY_BROKER_URL))
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_QUEUE", default="agentrunner")
# Redis redelivers a message not acknowledged within the visibility timeout: it must exceed the
# longest task (7 days, the API's bound) so a running task is never started twice by the broker.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 8 * 24 * 3600}
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# --- Repo pool ----------------------------------------------------------------------------------
AGENTRUNNER_HOST = env.str("AGENTRUNNER_HOST", default=socket.gethostname())
REPO_POOL_SETUP_TIMEOUT = env.int("REPO_POOL_SETUP_TIMEOUT", default=900)
REPO_POOL_GIT_TIMEOUT = env.int("REPO_POOL_GIT_TIMEOUT", default=600)
REPO_POOL_MAX_LEASE_SECONDS = env.int("REPO_POOL_MAX_LEASE_SECONDS", default=24 * 3600)
REPO_POOL_MAX_WAIT_SECONDS = env.int("REPO_POOL_MAX_WAIT_SECONDS", default=600)
# A slot stuck in cloning/resetting this long (its worker died mid-operation) is reaped.
REPO_POOL_STUCK_SECONDS = env.int("REPO_POOL_STUCK_SECONDS", default=1800)
# A slot that fetched a branch from origin less than this many seconds ago does not fetch again.
REPO_POOL_FETCH_TTL = env.float("REPO_POOL_FETCH_TTL", default=10.0)
# Folders under which a repository may be a local path or file:// URL (resolved, so ".." and
# symlinks cannot leave them). Unset: none in production; every local path when DEBUG is on (a
# laptop). "*" allows every local path explicitly. The slot pool itself is never allowed.
_local_repo_roots = env.list("AGENTRUNNER_LOCAL_REPO_ROOTS", default=None)
if _local_repo_roots is None:
    AGENTRUNNER_LOCAL_REPO_ROOTS: list[str] | None = None if DEBUG else []
elif "*" in _local_repo_roots:
    AGENTRUNNER_LOCAL_REPO_ROOTS = None
else:
    AGENTRUNNER_LOCAL_REPO_ROOTS = [str(Path(root).expanduser().resolve()) for root in _local_repo_roots if root]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("AGENTRUNNER_LOG_LEVEL", default="INFO")},
    "loggers": {"httpx": {"level": "WARNING"}, "httpx2": {"level": "WARNING"}},
}

# --- Inspector/metrics --------------------------------------------------------------------------
# The run pages (/runs/) sign users in with their own form (the admin's admits staff only).
LOGIN_URL = "inspector:login"
LOGIN_REDIRECT_URL = "inspector:runs"
LOGOUT_REDIRECT_URL = "inspector:login"
# /metrics answers staff (session or API token) and these scraper addresses or networks (CIDR).
AGENTRUNNER_METRICS_ALLOWED_NETWORKS = env.list("AGENTRUNNER_METRICS_ALLOWED_NETWORKS", default=[])
# The run page shows at most this much of a patch (bytes); the artifact downloads whole.
AGENTRUNNER_INSPECTOR_DIFF_MAX = env.int("AGENTRUNNER_INSPECTOR_DIFF_MAX", default=1024 * 1024)

# --- Runner -------------------------------------------------------------------------------------
# A running attempt whose runner has not heartbeated for this long is lost (its task runs again).
AGENTRUNNER_ATTEMPT_STALE_SECONDS = env.int("AGENTRUNNER_ATTEMPT_STALE_SECONDS", default=120)
# How long a runner keeps retrying what must be recorded (an attempt's finish, a slot's release, an
# artifact) while the database is unreachable, before it gives up and leaves it to the reaper.
AGENTRUNNER_DB_RETRY_SECONDS = env.float("AGENTRUNNER_DB_RETRY_SECONDS", default=60)
# The largest results bundle a remote runner may upload (POST /api/runner/v1/attempts/{id}/results/).
AGENTRUNNER_RESULTS_BUNDLE_MAX = env.int("AGENTRUNNER_RESULTS_BUNDLE_MAX", default=1024**3)
# How many host names one runner token may register (first come, first bound); a token's own
# max_hosts (create_runner_token --max-hosts, the admin) overrides it.
AGENTRUNNER_RUNNER_MAX_HOSTS = env.int("AGENTRUNNER_RUNNER_MAX_HOSTS", default=8)

# --- Sandbox ------------------------------------------------------------------------------------
# Every setup and test command runs under bubblewrap (see docs/security.md, "The sandbox").
# auto: bubblewrap when it works here, else (DEBUG only) no sandbox, loudly; production refuses.
# bwrap: bubblewrap or refuse. none: no sandbox (the operator accepts the risk).
AGENTRUNNER_SANDBOX = env.str("AGENTRUNNER_SANDBOX", default="auto")
if AGENTRUNNER_SANDBOX not in ("auto", "bwrap", "none"):
    raise ImproperlyConfigured("AGENTRUNNER_SANDBOX must be 'auto', 'bwrap' or 'none'")
AGENTRUNNER_BWRAP = env.str("AGENTRUNNER_BWRAP", default="bwrap")  # the executable (name or path)
# Read-only binds into the box of folders otherwise hidden (/root, /home): toolchains. Unset: the
# running interpreter's installation and the toolchains of PATH entries (~/.pyenv, ~/.nvm, ...).
AGENTRUNNER_SANDBOX_RO_PATHS = env.list("AGENTRUNNER_SANDBOX_RO_PATHS", default=None)
AGENTRUNNER_SANDBOX_MEMORY_BYTES = env.int("AGENTRUNNER_SANDBOX_MEMORY_BYTES", default=8 * 1024**3)
AGENTRUNNER_SANDBOX_MAX_PROCESSES = env.int("AGENTRUNNER_SANDBOX_MAX_PROCESSES", default=1024)
AGENTRUNNER_SANDBOX_MAX_FILE_BYTES = env.int("AGENTRUNNER_SANDBOX_MAX_FILE_BYTES", default=4 * 1024**3)
AGENTRUNNER_SANDBOX_OUTPUT_BYTES = env.int("AGENTRUNNER_SANDBOX_OUTPUT_BYTES", default=8 * 1024**2)
# A per-command cgroup (pids, memory) when one is writable; off: rlimits only.
AGENTRUNNER_SANDBOX_CGROUP = env.bool("AGENTRUNNER_SANDBOX_CGROUP", default=True)

# --- LLM ----------------------------------------------------------------------------------------
AGENTRUNNER_LLM_PROVIDER = env.str("AGENTRUNNER_LLM_PROVIDER", default="openai")  # openai | replay
AGENTRUNNER_LLM_REPLAY_FILE = env.str("AGENTRUNNER_LLM_REPLAY_FILE", default="")
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="")
AGENTRUNNER_LLM_MODEL = env.str("AGENTRUNNER_LLM_MODEL", default="gpt-4o-mini")
AGENTRUNNER_LLM_TIMEOUT = env.float("AGENTRUNNER_LLM_TIMEOUT", default=120.0)
AGENTRUNNER_LLM_MAX_RETRIES = env.int("AGENTRUNNER_LLM_MAX_RETRIES", default=4)
AGENTRUNNER_LLM_MAX_RETRY_WAIT = env.float("AGENTRUNNER_LLM_MAX_RETRY_WAIT", default=120.0)
AGENTRUNNER_LLM_BACKOFF_BASE = env.float("AGENTRUNNER_LLM_BACKOFF_BASE", default=1.0)
AGENTRUNNER_LLM_MAX_OUTPUT_TOKENS = env.int("AGENTRUNNER_LLM_MAX_OUTPUT_TOKENS", default=4096)
AGENTRUNNER_LLM_TEMPERATURE = env.float("AGENTRUNNER_LLM_TEMPERATURE", default=0.0)
# JSON: {"model": [usd_per_million_input, usd_per_million_output], ...}; merged over the defaults.
AGENTRUNNER_LLM_PRICES = env.json("AGENTRUNNER_LLM_PRICES", default={})
AGENTRUNNER_RUNNER_ID = env.str("AGENTRUNNER_RUNNER_ID", default="")  # default: host:pid
AGENTRUNNER_LEASE_SECONDS = env.int("AGENTRUNNER_LEASE_SECONDS", default=120)
AGENTRUNNER_SLOT_WAIT_SECONDS = env.float("AGENTRUNNER_SLOT_WAIT_SECONDS", default=30)
AGENTRUNNER_DEFAULT_MAX_STEPS = env.int("AGENTRUNNER_DEFAULT_MAX_STEPS", default=50)
AGENTRUNNER_TEST_TIMEOUT = env.int("AGENTRUNNER_TEST_TIMEOUT", default=900)
AGENTRUNNER_GIT_AUTHOR_NAME = env.str("AGENTRUNNER_GIT_AUTHOR_NAME", default="Agent Runner")
AGENTRUNNER_GIT_AUTHOR_EMAIL = env.str("AGENTRUNNER_GIT_AUTHOR_EMAIL", default="agent-runner@localhost")
AGENTRUNNER_PUBLIC_URL = env.str("AGENTRUNNER_PUBLIC_URL", default="http://127.0.0.1:8000")
# --- Remote runner: a runner host holds an API URL and a runner token, never the database --------
# Base URL of the server (the runner API lives under /api/runner/v1/); each service's own URL, when
# set, overrides it for that service (they may be served from different hosts).
AGENTRUNNER_API_URL = env.str("AGENTRUNNER_API_URL", default="")
TASK_REGISTRY_URL = env.str("TASK_REGISTRY_URL", default="")
REPO_POOL_URL = env.str("REPO_POOL_URL", default="")
ARTIFACT_STORE_URL = env.str("ARTIFACT_STORE_URL", default="")
AGENTRUNNER_RUNNER_TOKEN = env.str("AGENTRUNNER_RUNNER_TOKEN", default="")  # art_r_...: never logged
AGENTRUNNER_API_CONNECT_TIMEOUT = env.float("AGENTRUNNER_API_CONNECT_TIMEOUT", default=5.0)
AGENTRUNNER_API_READ_TIMEOUT = env.float("AGENTRUNNER_API_READ_TIMEOUT", default=30.0)
# One call is retried (connection errors, timeouts, 429, 502/503/504) for at most this long.
AGENTRUNNER_API_RETRY_SECONDS = env.float("AGENTRUNNER_API_RETRY_SECONDS", default=60.0)
# Delivering what a run buffered and its finish: tried until delivered, fenced, or this long.
AGENTRUNNER_API_FINISH_RETRY_SECONDS = env.float("AGENTRUNNER_API_FINISH_RETRY_SECONDS", default=900.0)
AGENTRUNNER_API_HEARTBEAT_RETRY_SECONDS = env.float("AGENTRUNNER_API_HEARTBEAT_RETRY_SECONDS", default=10.0)
AGENTRUNNER_API_BACKOFF_BASE = env.float("AGENTRUNNER_API_BACKOFF_BASE", default=0.25)
AGENTRUNNER_API_BACKOFF_MAX = env.float("AGENTRUNNER_API_BACKOFF_MAX", default=15.0)
# What this host announces it can hold: {"<repository name>": slots}; unset: the repository's pool size.
AGENTRUNNER_HOST_CAPACITY = env.json("AGENTRUNNER_HOST_CAPACITY", default={})
# A runner loop's long-poll: how long one claim waits on the server for a task to become runnable.
AGENTRUNNER_CLAIM_WAIT_SECONDS = env.float("AGENTRUNNER_CLAIM_WAIT_SECONDS", default=20.0)
# Beat: how often to reap, and when a queued task counts as lost by the broker.
AGENTRUNNER_REAP_INTERVAL = env.int("AGENTRUNNER_REAP_INTERVAL", default=60)
AGENTRUNNER_REQUEUE_AFTER = env.int("AGENTRUNNER_REQUEUE_AFTER", default=900)
CELERY_BEAT_SCHEDULE = {
    "reap-leases": {"task": "agentrunner.reap", "schedule": float(AGENTRUNNER_REAP_INTERVAL)},
    "requeue-stale": {"task": "agentrunner.requeue_stale", "schedule": float(AGENTRUNNER_REQUEUE_AFTER) / 3},
}
