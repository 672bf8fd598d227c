"""Fixtures of the ``sync`` tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session


@pytest.fixture
def sent(session: Session) -> Iterator[list[str]]:
    """The statements the session's connection sends (a test clears it after its set-up)."""
    statements: list[str] = []

    def listen(*args: Any) -> None:
        statements.append(args[2])

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", listen)
    yield statements
    event.remove(connection, "before_cursor_execute", listen)
