"""Find the PostgreSQL database for ``make test``: print its URL, creating it if missing.

Used when ``TEST_DATABASE_URL`` is not set: on 127.0.0.1:5432 as ``postgres``, a
database of its own (``courier_api_test``), never one that may hold someone's
data (the test run drops and recreates its ``public`` schema). Exits 1 with the
reason on standard error when PostgreSQL is not there or refuses.
"""

from __future__ import annotations

import sys

import psycopg
from psycopg import sql

SERVER = "postgresql://postgres@127.0.0.1:5432"
DATABASE = "courier_api_test"


def main() -> int:
    try:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=3) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    except psycopg.Error as exc:
        print(f"PostgreSQL at {SERVER} is not usable: {str(exc).strip()}", file=sys.stderr)
        return 1
    print(f"postgresql+psycopg://postgres@127.0.0.1:5432/{DATABASE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
