"""One page size for every list: the services' clamp is the API's bound."""

import re
from pathlib import Path

import sync

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
