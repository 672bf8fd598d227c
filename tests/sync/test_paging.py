"""One page size for every list: the services' clamp is the API's bound; one parser
of walks' cursors."""

import re
from pathlib import Path

import pytest

import sync
from sync.errors import InvalidCursor
from sync.paging import INT64_MAX, dotted_parts, malformed_cursor
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
    search = SearchCursor(9, 2, 5, walk_digest([3, 5]), "0123456789abcdef")
    assert SearchCursor.parse(str(search)) == search


def test_a_walks_digest_is_that_of_its_ids_whatever_its_pages() -> None:
    """The pages of a proof search's walk chain their ids' digest on from the page
    before; its last page reads every id of the walk in one statement: both give one
    digest when they hold the same ids in the same order, and another for ids of the
    same number and sum."""
    ids = [3, 6, 8, 11]
    assert walk_digest(ids[2:], walk_digest(ids[:2])) == walk_digest(ids)
    assert walk_digest([4, 5, 8, 11]) != walk_digest(ids)
    assert walk_digest([]) == "0" * 16 != walk_digest([0])
