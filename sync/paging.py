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

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, func
from sqlalchemy.orm import Session

from sync.errors import CursorReset, InvalidCursor
from sync.wording import matching_now

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
    r"([0-9]{1,19})\.([0-9]{1,19})\.([0-9]{1,19})\.([0-9]{1,10})\.([0-9]{1,10})\.([0-9a-f]{16})"
)
# A cursor of a walk begun before ``walked`` became the sums of its ids' mixes: it kept
# their sum, then a digest of them chained in order (``as_of.offset.after.walked.search``).
_EARLIER_WALK_CURSOR = re.compile(
    r"[0-9]{1,19}\.[0-9]{1,19}\.[0-9]{1,19}\.(?:[0-9]{1,19}|[0-9a-f]{16})\.[0-9a-f]{16}"
)

# A walk's digest (``walk_digest``): for each of ``_MIXES``, the sum of the mix of each
# id (``id_mix``) modulo ``DIGEST_PRIME``. The same arithmetic reads in Python and in SQL
# (``walk_sums``), on SQLite as on PostgreSQL: every intermediate is a non-negative
# integer below 2**63 (a residue below 2**31 times one below 2**31, plus one below 2**31),
# where ``%`` of both databases is Python's; a sum of a mix (each below 2**31) stays
# below 2**63 for 2**32 rows, SQLite's ``sum`` being an integer's.
DIGEST_PRIME = 2_147_483_647  # 2**31 - 1
_MIX_PRIMES = (2_147_483_629, 2_147_483_587)  # the two primes below it
# (a, c, b, d) of each mix, as ``id_mix`` uses them: each below both of _MIX_PRIMES.
_MIXES = (
    (1_597_334_677, 374_761_393, 1_181_783_497, 668_265_263),
    (99_338_871, 1_013_904_223, 1_664_525, 506_952_113),
)
WalkDigest = tuple[int, int]
# ``walked`` of a walk that showed nothing yet.
NOTHING_WALKED: WalkDigest = (0, 0)


@dataclass(frozen=True)
class WalkCursor:
    """Where a walk through a list by id stands (a proof search's, oldest first; the
    rejected events', newest first), ``as_of.offset.after.walked.search``: the walk reads
    the rows matching the search whose id is at most ``as_of``, the highest there was at
    its first page; ``offset`` of them were shown, the last being ``after``, and
    ``walked`` is the digest of their ids (``walk_digest``, two numbers); ``search`` is
    a digest of the search's filters (``sync.proofs.search_key``,
    ``sync.quarantine.search_key``)."""

    as_of: int
    offset: int
    after: int
    walked: WalkDigest
    search: str

    def __str__(self) -> str:
        first, second = self.walked
        return f"{self.as_of}.{self.offset}.{self.after}.{first}.{second}.{self.search}"

    @classmethod
    def parse(cls, raw: str | None) -> WalkCursor | None:
        """The cursor, or None for a walk's first page. One handed out before the walk
        kept the sums of its ids' mixes (it kept their sum, then a digest chained in
        order) is a 410: search again."""
        if raw is None or raw == "":
            return None
        if _EARLIER_WALK_CURSOR.fullmatch(raw):
            raise CursorReset(
                "the walk was begun by an earlier version of the server; search again from "
                "the start",
                field="cursor",
            )
        numbers, (search,) = dotted_parts(raw, _WALK_CURSOR, numbers=5)
        as_of, offset, after, first, second = numbers
        assert as_of is not None and offset is not None and after is not None
        assert first is not None and second is not None and search is not None
        if not 0 < after <= as_of or offset < 1:  # after: a row of the walk, shown
            raise malformed_cursor()
        if first >= DIGEST_PRIME or second >= DIGEST_PRIME:
            raise malformed_cursor()
        return cls(as_of, offset, after, (first, second), search)


def id_mix(row_id: Any, mix: int) -> Any:
    """The ``mix``-th mix of an id: an int for an int, the same arithmetic in SQL for a
    column. Not linear in the id (a product of two residues of it, each multiplied and
    shifted modulo a prime of its own), so that ids of the same number and the same sum
    (1 + 4 = 2 + 3) or the same sum of squares, swapped in and out of a walk, change the
    sums ``walk_digest`` keeps; the id modulo ``DIGEST_PRIME`` is added, so that ids
    ``_MIX_PRIMES`` apart do not mix alike."""
    a, c, b, d = _MIXES[mix]
    first, second = _MIX_PRIMES
    u = ((row_id % first) * a + c) % first
    v = ((row_id % second) * b + d) % second
    return (u * v + row_id % DIGEST_PRIME) % DIGEST_PRIME


def walk_digest(ids: Iterable[int], walked: WalkDigest = NOTHING_WALKED) -> WalkDigest:
    """The digest of a walk's ids, going on from ``walked`` (that of the ids before
    them): for each mix, the sum of the mixes of the ids modulo ``DIGEST_PRIME``. In any
    order, so the pages of a walk, each going on from the one before, and one statement
    summing every id of the walk in SQL (``walk_sums``) agree; with their number, they
    tell ids that stopped matching from others that came to match with the same sum
    (ids 3 and 6 shown, 4 and 5 matching at the last page), which a sum of the ids did
    not."""
    sums = list(walked)
    for row_id in ids:
        for mix in range(len(_MIXES)):
            sums[mix] = (sums[mix] + id_mix(row_id, mix)) % DIGEST_PRIME
    return sums[0], sums[1]


def walk_sums(column: ColumnElement[int]) -> list[ColumnElement[Any]]:
    """The columns of one statement reading a walk's ids' number and their digest's
    sums (before their modulo): give the row to ``summed_walk``."""
    return [func.count(column), *(func.sum(id_mix(column, mix)) for mix in range(len(_MIXES)))]


def summed_walk(row: Sequence[Any]) -> tuple[int, WalkDigest]:
    """The number of ids and their digest of a row of ``walk_sums`` (a sum of none is
    NULL; PostgreSQL's sum of a BIGINT is a NUMERIC)."""
    found, *sums = row
    first, second = (int(total or 0) % DIGEST_PRIME for total in sums)
    return int(found), (first, second)


def same_search(cursor: WalkCursor | None, key: str, *, of: str) -> None:
    """Refuse (400 ``cursor_malformed``) a cursor of another ``of`` than the one asked
    for: its ``search`` is not ``key`` (other filters, or another station's)."""
    if cursor is not None and cursor.search != key:
        raise InvalidCursor(
            f"the cursor is of another {of} (other filters, or another station's); send "
            "it back with the filters of the page that gave it",
            field="cursor",
        )


def check_walk(
    session: Session,
    sums: Select[Any],
    *,
    count: int,
    walked: WalkDigest,
    showed: str,
    why: str,
) -> None:
    """Refuse a walk's last page (410 ``cursor_reset``) when the rows matching its
    search up to its ``as_of`` are not the ``count`` it showed, whose ids' digest is
    ``walked``: ``sums`` reads their number and digest (``walk_sums``), one statement
    (an index's, no row), so that the last page of a walk through a year reads none of
    its million ids into Python. The refusal says what the walk ``showed``, how many
    match now, and ``why`` they differ."""
    found, digest = summed_walk(session.execute(sums).one())
    if (found, digest) != (count, walked):
        raise CursorReset(
            f"this walk showed {showed}; {matching_now(found, count)}: {why}",
            field="cursor",
        )
