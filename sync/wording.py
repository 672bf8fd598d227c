"""How the command line's progress lines and summaries count what they did."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``1 parcel``, ``2 parcels``, ``2 pushes``; ``plural`` where adding ``s`` (``es``
    after sh, ch or s) does not make it (``drop's bounds``, ``drops' bounds``)."""
    if count == 1:
        return f"{count} {noun}"
    if plural is None:
        plural = f"{noun}{'es' if noun.endswith(('sh', 'ch', 's')) else 's'}"
    return f"{count} {plural}"
