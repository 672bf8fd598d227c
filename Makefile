# The two commands a new machine needs: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 2
PG_TEST_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: install run test test-sqlite test-postgres lint openapi clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

run: install
	$(BIN)/courier-api db upgrade
	$(BIN)/courier-api seed-demo --if-empty
	$(BIN)/courier-api serve --host $(HOST) --port $(PORT) --workers $(WORKERS)

# SQLite always; PostgreSQL when TEST_DATABASE_URL is set or 127.0.0.1:5432 answers.
test: install
	@$(MAKE) --no-print-directory test-sqlite
	@if [ -n "$${TEST_DATABASE_URL:-}" ] || $(BIN)/python -c \
	    "import socket; socket.create_connection(('127.0.0.1', 5432), 1).close()" 2>/dev/null; then \
	  $(MAKE) --no-print-directory test-postgres; \
	else \
	  echo "== PostgreSQL pass skipped: TEST_DATABASE_URL is unset and 127.0.0.1:5432 does not answer =="; \
	fi

test-sqlite: install
	@echo "== tests on SQLite =="
	env -u TEST_DATABASE_URL $(BIN)/pytest $(PYTEST_ARGS)

test-postgres: install
	@echo "== tests on PostgreSQL: $${TEST_DATABASE_URL:-$(PG_TEST_URL)} =="
	TEST_DATABASE_URL="$${TEST_DATABASE_URL:-$(PG_TEST_URL)}" $(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check courier_api sync models tests

openapi: install
	APP_ENV=testing JWT_SECRET=openapi-generation-only-secret-0000000000 \
	  $(BIN)/courier-api openapi write --format json openapi/openapi.json
	@echo "wrote openapi/openapi.json"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis test-output
