"""How long a page of a list may be, one number for every list.

The services clamp a list's ``limit`` to it and the API refuses a longer one
(``courier_api.api.base.PageArgs``, the pull's ``PullArgs``), so the most a
client may ask for is the most a service gives.
"""

from __future__ import annotations

MAX_PAGE_SIZE = 500  # items of a list answered at once, at most
