#!/usr/bin/env bash
# `make test`: the SQLite pass and, when PostgreSQL answers, the PostgreSQL pass beside it.
#
# The two passes share no database (the SQLite pass makes its files under pytest's
# temporary directory, the PostgreSQL pass uses its own database), so they run at once:
# on two cores the suite takes about as long as its longer pass instead of both in turn.
# The SQLite pass prints as it goes; the PostgreSQL pass writes to
# test-output/postgresql.log, which is followed here once the SQLite pass is done.
set -uo pipefail
cd "$(dirname "$0")/.."

MAKE="${MAKE:-make}"
python="${BIN:-.venv/bin}/python"

url="${TEST_DATABASE_URL:-}"
if [ -z "${url}" ] && ! url="$("${python}" -m tests.pg_database)"; then
  echo "== PostgreSQL pass skipped (set TEST_DATABASE_URL to run it) =="
  exec "${MAKE}" --no-print-directory test-sqlite
fi

mkdir -p test-output
log=test-output/postgresql.log
echo "== the PostgreSQL pass runs beside the SQLite pass, its output in ${log} =="
# A session of its own, so that stopping `make test` (Ctrl-C) stops this pass too.
TEST_DATABASE_URL="${url}" setsid "${MAKE}" --no-print-directory test-postgres >"${log}" 2>&1 &
postgres_pid=$!
trap 'kill -- -"${postgres_pid}" 2>/dev/null' EXIT

"${MAKE}" --no-print-directory test-sqlite
sqlite_status=$?

echo "== the PostgreSQL pass (${log}) =="
tail -n +1 -f --pid="${postgres_pid}" "${log}"
wait "${postgres_pid}"
postgres_status=$?
trap - EXIT

echo "== SQLite pass: exit ${sqlite_status}; PostgreSQL pass: exit ${postgres_status} =="
[ "${sqlite_status}" -eq 0 ] && [ "${postgres_status}" -eq 0 ]
