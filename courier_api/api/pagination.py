"""Keyset pagination: pages stay cheap however many rows come before them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def keyset_page(items: Sequence[T], limit: int, *, key: Callable[[T], Any]) -> dict[str, Any]:
    """``{"items": ..., "next_after": <key of the last item, or None on the last page>}``."""
    next_after = key(items[-1]) if len(items) >= limit and items else None
    return {"items": items, "next_after": next_after}
