"""How long a page of a list may be, one number for every list, and how a walk's
cursor is read.

The services clamp a list's ``limit`` to it and the API refuses a longer one
(``courier_api.api.base.PageArgs``, the pull's ``PullArgs``), so the most a
client may ask for is the most a service gives.

A walk's cursor (a parcel's timeline's, ``sync.parcels.TimelineCursor``; a proof
search's, ``sync.proofs.SearchCursor``) is dotted parts, numbers and digests, read by
``dotted_parts``: each number one a 64-bit column holds, each cursor refused in the
same words (``malformed_cursor``).
"""

from __future__ import annotations

import re

from sync.errors import InvalidCursor

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
