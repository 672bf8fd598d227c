"""Keyset pagination: pages stay cheap however many rows come before them.

A walk (``sync.paging.WalkCursor``: a proof search's, the rejected events') answers
and logs its pages alike, whatever it walks: ``walk_page``, ``page_logged``, and a
cursor sent with the deprecated ``after`` is refused in the same words
(``cursor_or_after``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from sync.errors import InvalidInput

T = TypeVar("T")


def keyset_page(items: Sequence[T], limit: int, *, key: Callable[[T], Any]) -> dict[str, Any]:
    """``{"items": ..., "next_after": <key of the last item, or None on the last page>}``."""
    next_after = key(items[-1]) if len(items) >= limit and items else None
    return {"items": items, "next_after": next_after}


class WalkPage(Protocol):
    """A page of a walk, as ``sync.proofs.search_page`` and
    ``sync.quarantine.walk_quarantined`` give it."""

    @property
    def as_of(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def arrived_since(self) -> int: ...
    @property
    def next_cursor(self) -> object | None: ...


def cursor_or_after(sent: str | None, after: int | None) -> None:
    """Refuse a page asked for by both a walk's ``cursor`` and the deprecated ``after``
    (422 ``cursor_and_after``)."""
    if sent is not None and after:
        raise InvalidInput(
            "send cursor or after, not both (after is deprecated: use cursor)",
            code="cursor_and_after",
            field="after",
        )


def walk_page(
    items: Sequence[T], limit: int, *, key: Callable[[T], Any], walk: WalkPage | None
) -> dict[str, Any]:
    """``keyset_page`` with the walk's ``as_of``, ``arrived_since`` and ``next_cursor``
    (each None for a page read by the deprecated ``after``: ``walk`` None)."""
    return {
        **keyset_page(items, limit, key=key),
        "as_of": None if walk is None else walk.as_of,
        "arrived_since": None if walk is None else walk.arrived_since,
        "next_cursor": None if walk is None else _next_cursor(walk),
    }


def walk_logged(walk: WalkPage, sent: str | None, entries: int) -> dict[str, Any]:
    """Which page of which walk ``walk`` was, as an auditor's read records it
    (``proofs_searched``, ``quarantine_searched``; the API's and the pages' alike): the
    ``cursor`` sent (None: a first page), the walk's ``as_of``, the page's ``offset`` in
    it and its ``entries``, ``arrived_since`` and the ``next_cursor`` given."""
    return {
        "cursor": sent,
        "as_of": walk.as_of,
        "offset": walk.offset,
        "entries": entries,
        "arrived_since": walk.arrived_since,
        "next_cursor": _next_cursor(walk),
    }


def page_logged(
    page: dict[str, Any], walk: WalkPage | None, sent: str | None, after: int
) -> dict[str, Any]:
    """Which page ``page`` (``walk_page``'s) was, as an auditor's read of it records it:
    ``walk_logged``, or for a page read by the deprecated ``after`` (``walk`` None) that
    ``after`` and the ``next_after`` given."""
    if walk is None:
        return {"after": after, "next_after": page["next_after"]}
    return walk_logged(walk, sent, len(page["items"]))


def _next_cursor(walk: WalkPage) -> str | None:
    return None if walk.next_cursor is None else str(walk.next_cursor)
