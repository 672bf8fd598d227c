"""One page size for every list: the services' clamp is the API's bound; one parser
of walks' cursors."""

import random
import re
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, Column, MetaData, Table, insert, select
from sqlalchemy.orm import Session

import sync
from sync.errors import CursorReset, InvalidCursor
from sync.paging import (
    DIGEST_PRIME,
    INT64_MAX,
    NOTHING_WALKED,
    WalkCursor,
    dotted_parts,
    malformed_cursor,
    summed_walk,
    walk_sums,
)
from sync.parcels import TimelineCursor
from sync.proofs import SearchCursor, walk_digest

ASSIGNED = re.compile(r"^MAX_PAGE_SIZE\b.*=", re.MULTILINE)


def test_the_page_size_is_set_in_one_place() -> None:
    """A module of sync/ with a page size of its own could drift from the others and
    from the API's bound (``PageArgs``): a client refused a limit a service gives, or
    given fewer items than it asked for and was allowed. Each imports
    ``sync.paging.MAX_PAGE_SIZE``."""
    setting = sorted(
        path.stem
        for path in Path(sync.__path__[0]).glob("*.py")
        if ASSIGNED.search(path.read_text(encoding="utf-8"))
    )
    assert setting == ["paging"]


def test_a_cursor_is_read_by_one_parser_of_dotted_numbers() -> None:
    """A walk's cursor, a timeline's or a proof search's, is its dotted numbers, each one
    a BIGINT holds, and its text parts; anything else is the same ``cursor_malformed``
    for both, which read it with ``dotted_parts``."""
    shape = re.compile(r"([0-9]{1,19})\.([0-9]{1,19})(?:\.([0-9a-f]{4}))?")
    assert dotted_parts("1.2.abcd", shape, numbers=2) == ([1, 2], ["abcd"])
    assert dotted_parts("1.2", shape, numbers=2) == ([1, 2], [None])
    assert dotted_parts(f"{INT64_MAX}.0", shape, numbers=2) == ([INT64_MAX, 0], [None])
    for raw in ("", "1", "1.2.", "1.2.ABCD", f"{INT64_MAX + 1}.0", "1.2.abcd.3", " 1.2"):
        with pytest.raises(InvalidCursor) as refused:
            dotted_parts(raw, shape, numbers=2)
        assert refused.value.code == "cursor_malformed" and refused.value.field == "cursor"
    for cursor in (TimelineCursor, SearchCursor):
        with pytest.raises(InvalidCursor) as refused:
            cursor.parse(f"{INT64_MAX + 1}.1.1")
        assert str(refused.value) == str(malformed_cursor())
    timeline = TimelineCursor(7, 3, 5, 1_700_000_000_000_000, "0123456789abcdef")
    assert TimelineCursor.parse(str(timeline)) == timeline
    assert TimelineCursor.parse("7.3.5") == TimelineCursor(7, 3, 5)
    kept = TimelineCursor(7, 3, 5, 1_700_000_000_000_000, "0123456789abcdef", "fedcba9876543210")
    assert TimelineCursor.parse(str(kept)) == kept
    search = SearchCursor(9, 2, 5, walk_digest([3, 5]), "0123456789abcdef")
    assert SearchCursor.parse(str(search)) == search


def test_a_walks_digest_is_that_of_its_ids_whatever_its_pages() -> None:
    """The pages of a walk go on from the digest of the page before; its last page sums
    every id of the walk in one statement: both give one digest when they hold the same
    ids, in whatever order, and another for ids of the same number and the same sum
    (1 + 4 = 2 + 3), the same sum of squares (1 + 64 = 16 + 49), or the same sums of
    their first three powers ({1, 5, 6} and {2, 3, 7})."""
    ids = [3, 6, 8, 11]
    assert walk_digest(ids[2:], walk_digest(ids[:2])) == walk_digest(ids)
    assert walk_digest(reversed(ids)) == walk_digest(ids)
    assert walk_digest([4, 5, 8, 11]) != walk_digest(ids)
    assert walk_digest([]) == NOTHING_WALKED != walk_digest([0]) != walk_digest([1])
    for shown, matching in (
        ([1, 4], [2, 3]),
        ([1, 8], [4, 7]),
        ([1, 5, 6], [2, 3, 7]),
        ([10**6 + 1, 10**6 + 4], [10**6 + 2, 10**6 + 3]),
        ([5, 5 + 2_147_483_629], [5 + 2_147_483_587, 5 + 2 * 2_147_483_629]),
    ):
        assert walk_digest(shown) != walk_digest(matching), (shown, matching)


def test_a_walk_summed_in_sql_has_the_digest_its_pages_keep(session: Session) -> None:
    """The last page of a walk sums a mix of the ids matching, in SQL (``walk_sums``),
    the pages summed the same mix of those shown in Python (``walk_digest``): on SQLite
    as on PostgreSQL, for ids anywhere up to the highest a BIGINT holds, each
    intermediate below 2**63 (SQLite makes an overflowing product a float, and its
    ``sum`` refuses to overflow), the same number and digest, or a walk holding every
    matching id would be refused at its last page."""
    table = Table("walk_ids", MetaData(), Column("id", BigInteger), prefixes=["TEMPORARY"])
    table.create(session.connection())
    draw = random.Random(20261205)
    edges = [1, 2, DIGEST_PRIME - 1, DIGEST_PRIME, 2_147_483_629, 2**31, 2**32 - 1]
    sets = [[], [1], edges + [INT64_MAX, INT64_MAX - 1]]
    sets += [draw.sample(range(1, 10**7), draw.randint(1, 300)) for _ in range(6)]
    sets += [[draw.randint(1, INT64_MAX) for _ in range(draw.randint(1, 300))] for _ in range(6)]
    for ids in sets:
        session.execute(table.delete())
        if ids:
            session.execute(insert(table), [{"id": row_id} for row_id in ids])
        row = session.execute(select(*walk_sums(table.c.id))).one()
        assert summed_walk(row) == (len(ids), walk_digest(ids)), ids


def test_a_walk_cursor_of_an_earlier_form_is_a_reset() -> None:
    """A cursor handed out when a walk kept the sum of its ids, or a digest of them
    chained in order (``as_of.offset.after.walked.search``), cannot be gone on from: a
    410, search again. One whose digest is not one this server makes is malformed."""
    key = "0123456789abcdef"
    for earlier in (f"9.2.5.8.{key}", f"9.2.5.{key}.{key}"):
        with pytest.raises(CursorReset):
            WalkCursor.parse(earlier)
    cursor = WalkCursor(9, 2, 5, walk_digest([3, 5]), key)
    assert WalkCursor.parse(str(cursor)) == cursor
    for wrong in (
        f"9.2.5.{DIGEST_PRIME}.0.{key}",
        f"9.2.5.0.{10**10}.{key}",
        f"9.2.5.1.2.3.{key}",
    ):
        with pytest.raises(InvalidCursor) as refused:
            WalkCursor.parse(wrong)
        assert refused.value.code == "cursor_malformed", wrong


def test_a_rejected_events_walk_refused_after_one_shown_says_one(session: Session) -> None:
    """The quarantine walk's 410 said "this walk showed 1 rejected events ...; 1 match
    now": one shown, one matching, each is told in the singular."""
    from sync.quarantine import QuarantineFilter
    from sync.quarantine import _check_walk as check_rejected_walk

    with pytest.raises(CursorReset) as refused:
        check_rejected_walk(session, QuarantineFilter(station_id=1), 5, 1, walk_digest([5]))
    assert refused.value.message.startswith(
        "this walk showed 1 rejected event up to id 5; 0 match now:"
    ), refused.value.message
