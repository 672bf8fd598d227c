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

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
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
