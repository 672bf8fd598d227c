# The two commands a new machine needs: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 2
THREADS ?= 8
# The demo runs the scheduled jobs inside the web workers (a lease picks one of them).
SCHEDULER_IN_WEB ?= true
# Logs for people on a terminal; the service's default is one JSON object a line.
LOG_FORMAT ?= text

.PHONY: install run test test-sqlite test-postgres lint openapi clean

install: $(VENV)/.installed

# .venv is built with PYTHON when it has no interpreter of 3.11+: one an older python3
# left is built again (the venv module run over it would keep its interpreter), and an
# older PYTHON builds none, saying how to name another.
NEW_ENOUGH := import sys; sys.exit(sys.version_info < (3, 11))

$(VENV)/.installed: pyproject.toml constraints.txt
	@if ! $(BIN)/python -c '$(NEW_ENOUGH)' 2>/dev/null; then \
	  $(PYTHON) -c '$(NEW_ENOUGH)' || { echo "$(PYTHON) is not Python 3.11+, which the service needs: name one, make run PYTHON=python3.12" >&2; exit 1; }; \
	  clear=; if [ -e $(BIN)/python ] || [ -L $(BIN)/python ]; then clear=--clear; fi; \
	  echo "$(PYTHON) -m venv $$clear $(VENV)"; $(PYTHON) -m venv $$clear $(VENV); \
	fi
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

run: export LOG_FORMAT := $(LOG_FORMAT)
# The demo, whatever the shell exports: seed-demo is refused with APP_ENV=production.
run: export APP_ENV := development
run: install
	$(BIN)/courier-api db upgrade
	$(BIN)/courier-api seed-demo --if-empty
	SCHEDULER_IN_WEB=$(SCHEDULER_IN_WEB) $(BIN)/courier-api serve --host $(HOST) --port $(PORT) --workers $(WORKERS) --threads $(THREADS)

# SQLite always; then PostgreSQL: TEST_DATABASE_URL when set (and then it must work),
# else the database courier_api_test on 127.0.0.1:5432, created if missing, when it answers.
test: install
	@MAKE="$(MAKE)" BIN="$(BIN)" bash tests/passes.sh

test-sqlite: install
	@echo "== tests on SQLite =="
	@chromium="$${CHROMIUM:-/usr/bin/chromium}"; if [ ! -x "$$chromium" ]; then \
	  case "$${CI:-}" in true|1|yes) echo "== no Chromium at $$chromium: the browser tests fail (CI) ==";; \
	  *) echo "== browser tests skipped: no Chromium at $$chromium ==";; esac; fi
	env -u TEST_DATABASE_URL $(BIN)/pytest $(PYTEST_ARGS)

test-postgres: install
	@test -n "$${TEST_DATABASE_URL:-}" || { echo "set TEST_DATABASE_URL" >&2; exit 2; }
	@echo "== tests on PostgreSQL: $${TEST_DATABASE_URL} =="
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check courier_api sync models tests

openapi: install
	APP_ENV=testing JWT_SECRET=openapi-generation-only-secret-0000000000 \
	  $(BIN)/courier-api openapi write --format json openapi/openapi.json
	@echo "wrote openapi/openapi.json"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis test-output
