# Agent Runner: `make test` runs the whole suite, `make demo` the quick start.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test test-live test-deployed lint demo demo-live serve bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

demo: $(VENV)/.installed  ## quick start: a sample task, with the model's answers replayed offline
	$(PY) manage.py migrate --noinput -v 0
	$(PY) manage.py demo

demo-live: $(VENV)/.installed  ## the same with a real model (OPENAI_API_KEY, optionally OPENAI_BASE_URL)
	$(PY) manage.py migrate --noinput -v 0
	$(PY) manage.py demo --live

# The API (/api/, docs at /api/docs/) and the admin (/admin/) on the demo's database.
ADDR ?= 127.0.0.1:8000
serve: $(VENV)/.installed  ## gunicorn on $(ADDR); static files collected for WhiteNoise
	$(PY) manage.py migrate --noinput -v 0
	$(PY) manage.py collectstatic --noinput -v 0
	$(VENV)/bin/gunicorn agentrunner.wsgi -k gthread -w 2 --threads 8 -b $(ADDR) --timeout 600

# Side-by-side measurements with their floors (about 20 minutes). They need a PostgreSQL server where
# the user may create databases (BENCH_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/postgres)
# and pgbench; each makes scratch databases, folders and ports of its own and removes them. The
# artifacts bench goes last: the writeback of its gigabytes would still load the disk under the next.
bench: $(VENV)/.installed
	$(PY) bench/registry.py
	$(PY) bench/pool.py
	$(PY) bench/pool.py --database sqlite --rounds 5
	$(PY) bench/runner.py --tasks 20 --speedup-delay 0.5 --speedup-tasks 8
	$(PY) bench/sandbox.py
	$(PY) bench/artifacts.py

clean:
	rm -rf var

test-live: $(VENV)/.installed  ## the live_llm tests against the real API (needs OPENAI_API_KEY)
	$(PY) -m pytest -m live_llm tests/agent/test_live_llm.py

# The integration suite against a deployed instance (README, "Development"): the services' URLs and
# a staff token say which; without them the suite would start a server of its own instead.
test-deployed: $(VENV)/.installed  ## tests/integration against TASK_REGISTRY_URL, REPO_POOL_URL, ARTIFACT_STORE_URL
	@for name in TASK_REGISTRY_URL REPO_POOL_URL ARTIFACT_STORE_URL AGENTRUNNER_API_TOKEN; do \
	    if [ -z "$$(printenv $$name)" ]; then echo "make test-deployed: set $$name (see README, Development)" >&2; exit 2; fi; \
	done
	$(PY) -m pytest -m integration tests/integration $(PYTEST_ARGS)
