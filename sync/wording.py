"""How the command line's progress lines and summaries, and the messages of refusals,
count what they name."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``1 parcel``, ``2 parcels``, ``2 pushes``; ``plural`` where adding ``s`` (``es``
    after sh, ch or s) does not make it (``drop's bounds``, ``drops' bounds``)."""
    if count == 1:
        return f"{count} {noun}"
    if plural is None:
        plural = f"{noun}{'es' if noun.endswith(('sh', 'ch', 's')) else 's'}"
    return f"{count} {plural}"


def matching_now(found: int, shown: int) -> str:
    """``0 match now``, ``1 matches now``; ``2 match now, not the same ones`` when as many
    match as a walk ``shown``: what a walk's refused last page found matching
    (``sync.proofs``, ``sync.quarantine``)."""
    text = f"{found} {'matches' if found == 1 else 'match'} now"
    if found != shown:
        return text
    return f"{text}, not the same {'one' if found == 1 else 'ones'}"
