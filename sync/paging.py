"""How long a page of a list may be, one number for every list, and how a walk's
cursor is read.

The services clamp a list's ``limit`` to it and the API refuses a longer one
(``courier_api.api.base.PageArgs``, the pull's ``PullArgs``), so the most a
client may ask for is the most a service gives.

A walk's cursor (a parcel's timeline's, ``sync.parcels.TimelineCursor``; a proof
search's and the rejected events', ``WalkCursor``) is dotted parts, numbers and
digests, read by ``dotted_parts``: each number one a 64-bit column holds, each cursor
refused in the same words (``malformed_cursor``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sync.errors import CursorReset, InvalidCursor

MAX_PAGE_SIZE = 500  # items of a list answered at once, at most
INT64_MAX = 2**63 - 1  # the highest id (a BIGINT) a cursor's number may name


def malformed_cursor() -> InvalidCursor:
    """What a cursor this server never handed out in that form is answered (400
    ``cursor_malformed``), whichever walk it claims to be of."""
    return InvalidCursor(
        "the cursor is malformed; send back a next_cursor exactly as received", field="cursor"
    )


def dotted_parts(
    raw: str, shape: re.Pattern[str], *, numbers: int
) -> tuple[list[int | None], list[str | None]]:
    """The parts of the cursor ``raw``, whole of ``shape`` (a pattern of dotted groups):
    its first ``numbers`` groups as numbers, each at most ``INT64_MAX``, and the others
    as text; a group ``shape`` leaves out (an optional part) is None. Raises
    ``malformed_cursor()`` for anything else; the caller checks its own fields' bounds
    (and raises the same)."""
    match = shape.fullmatch(raw)
    if match is None:
        raise malformed_cursor()
    groups = match.groups()
    values = [None if group is None else int(group) for group in groups[:numbers]]
    if any(value is not None and value > INT64_MAX for value in values):
        raise malformed_cursor()
    return values, list(groups[numbers:])


_WALK_CURSOR = re.compile(
    r"([0-9]{1,19})\.([0-9]{1,19})\.([0-9]{1,19})\.([0-9a-f]{16})\.([0-9a-f]{16})"
)
# A cursor of a proof search's walk begun before ``walked`` replaced the sum of the ids
# it showed.
_SUMMED_WALK_CURSOR = re.compile(
    r"[0-9]{1,19}\.[0-9]{1,19}\.[0-9]{1,19}\.[0-9]{1,19}\.[0-9a-f]{16}"
)
# ``walked`` of a walk that showed nothing yet.
NOTHING_WALKED = "0" * 16


@dataclass(frozen=True)
class WalkCursor:
    """Where a walk through a list by id stands (a proof search's, oldest first; the
    rejected events', newest first), ``as_of.offset.after.walked.search``: the walk reads
    the rows matching the search whose id is at most ``as_of``, the highest there was at
    its first page; ``offset`` of them were shown, the last being ``after``, and
    ``walked`` is the digest of their ids in that order (``walk_digest``); ``search`` is
    a digest of the search's filters (``sync.proofs.search_key``,
    ``sync.quarantine.search_key``)."""

    as_of: int
    offset: int
    after: int
    walked: str
    search: str

    def __str__(self) -> str:
        return f"{self.as_of}.{self.offset}.{self.after}.{self.walked}.{self.search}"

    @classmethod
    def parse(cls, raw: str | None) -> WalkCursor | None:
        """The cursor, or None for a walk's first page. One handed out before the walk
        kept the digest of its ids (it kept their sum) is a 410: search again."""
        if raw is None or raw == "":
            return None
        if not _WALK_CURSOR.fullmatch(raw) and _SUMMED_WALK_CURSOR.fullmatch(raw):
            raise CursorReset(
                "the walk was begun by an earlier version of the server; search again from "
                "the start",
                field="cursor",
            )
        (as_of, offset, after), (walked, search) = dotted_parts(raw, _WALK_CURSOR, numbers=3)
        assert as_of is not None and offset is not None and after is not None
        assert walked is not None and search is not None
        if not 0 < after <= as_of or offset < 1:  # after: a row of the walk, shown
            raise malformed_cursor()
        return cls(as_of, offset, after, walked, search)


def walk_digest(ids: Iterable[int], walked: str = NOTHING_WALKED) -> str:
    """The digest of a walk's ids, in order, going on from ``walked`` (that of the ids
    before them): 16 hex digits, each id chained onto the digest of those before it, so
    that the pages of a walk, each going on from the one before, and one statement
    reading every id of the walk, give the same digest when, and only when, they hold
    the same ids. A sum of the ids (with their number) did not tell two deliveries that
    stopped matching from two that came to match with the same sum (ids 3 and 6 shown,
    4 and 5 matching at the last page), and the walk ended short of both."""
    digest = bytes.fromhex(walked)
    for row_id in ids:
        digest = hashlib.sha256(digest + row_id.to_bytes(8, "big")).digest()[:8]
    return digest.hex()
